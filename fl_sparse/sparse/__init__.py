"""Mask arithmetic shared by every mask and freeze policy."""
