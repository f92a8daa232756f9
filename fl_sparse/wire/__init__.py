"""The byte layout of every payload (:mod:`~fl_sparse.wire.layout`, documented in ``docs/design.md``) and its
validating decoders (:mod:`~fl_sparse.wire.decoding`), which check each record against the receiver's model
before anything is allocated. The codecs (:mod:`fl_sparse.parts.codecs`) are built on these."""
