"""Rerun the ``kernels``-marked tests with the CPU kernels forced one instruction-set level below the host's.

The same float computation can round differently under AVX-512 and AVX2 kernels (another vector width,
blocking or reduction order), so a test that holds on the host it was written on can fail on another.
Forcing the kernels down a level makes that host dependence show up on whatever machine CI runs on:
an AVX-512 host runs what an AVX2-only host (e.g. an AMD EPYC before Zen 4) would, an AVX2 host runs the
pre-AVX kernels. Three libraries pick kernels by ISA, each with its own switch:

* ATen's own kernels: ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``);
* oneDNN (convolutions): ``ONEDNN_MAX_CPU_ISA`` (``SSE41``, ``AVX``, ``AVX2``, ``AVX512_CORE``, ...);
* MKL (matmuls, where torch uses MKL): ``MKL_ENABLE_INSTRUCTIONS`` (``SSE4_2``, ``AVX``, ``AVX2``, ``AVX512``).

oneDNN and MKL silently ignore a value they do not know, so before running the tests a probe process
checks that each library reports the forced level. MKL names its kernels only on Intel CPUs; on others (AMD
EPYC) its verbose line names none, so its switch is still set but cannot be checked there, and the pass says
so. Usage: ``python tools/kernels_down.py [pytest args]``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

#: The host's ATen capability -> what to force, and what each library then reports (its verbose ISA line).
LEVEL_BELOW = {
    "AVX512": {"env": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
               "aten": "AVX2", "onednn": "isa:Intel AVX2", "mkl": "(Intel(R) AVX2)"},
    "AVX2": {"env": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                     "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
             "aten": "DEFAULT", "onednn": "isa:Intel SSE4.1", "mkl": "(Intel(R) SSE4.2)"},
}
SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

# One convolution (oneDNN) and one matmul (MKL) so that both libraries print the ISA they dispatch to.
PROBE = """
import torch
torch.nn.functional.conv2d(torch.randn(2, 3, 16, 16), torch.randn(6, 3, 5, 5))
torch.nn.functional.linear(torch.randn(64, 64), torch.randn(64, 64))
print("aten:" + torch.backends.cpu.get_cpu_capability())
"""


def probe(env: dict[str, str]) -> dict[str, str]:
    """The ISA line each library reports under ``env`` ('' for a library this torch does not use)."""
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    first = lambda prefix: next((line for line in out if line.startswith(prefix)), "")  # noqa: E731
    return {"aten": first("aten:").removeprefix("aten:"), "onednn": first("onednn_verbose,v1,info,cpu,isa:"),
            "mkl": first("MKL_VERBOSE oneMKL") or first("MKL_VERBOSE Intel")}


NAMES = {"aten": "ATen", "onednn": "oneDNN", "mkl": "MKL"}
#: How each library's verbose line names the kernels it dispatches to. MKL's "(Intel(R) AVX2)" appears only on
#: Intel CPUs ("... Intel(R) Architecture processors" elsewhere).
NAMES_ISA = {"aten": re.compile(r"."), "onednn": re.compile(r"isa:"), "mkl": re.compile(r"\(Intel\(R\) [^)]+\)")}


def check(host: dict[str, str], forced: dict[str, str],
          wanted: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(what did not take the forced level, libraries that showed they took it, libraries whose level this host
    cannot show).

    A library this torch does not use (no verbose line on the host) has nothing to check; ATen always has one."""
    wrong, verified, unverifiable = [], [], []
    for lib in ("aten", "onednn", "mkl"):
        if not host[lib] and lib != "aten":
            continue
        if not NAMES_ISA[lib].search(host[lib]):
            unverifiable.append(lib)
        elif wanted[lib] not in forced[lib]:
            wrong.append(f"{lib} reports {forced[lib]!r}, wanted {wanted[lib]!r}")
        else:
            verified.append(lib)
    return wrong, verified, unverifiable


def main(pytest_args: list[str]) -> int:
    host_env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    host = probe(host_env)
    if host["aten"] not in LEVEL_BELOW:
        print(f"kernels-down: the host's CPU capability is {host['aten']}; there is no lower level to force, skipping")
        return 0
    level = LEVEL_BELOW[host["aten"]]
    forced_env = {**host_env, **level["env"]}
    forced = probe(forced_env)
    wrong, verified, unverifiable = check(host, forced, level)
    if wrong:
        print("kernels-down: forcing the kernels down did not take effect: " + "; ".join(wrong), file=sys.stderr)
        return 1
    settings = " ".join(f"{k}={v}" for k, v in level["env"].items())
    print(f"kernels-down: host {host['aten']} -> forced {level['aten']} ({settings}; "
          f"{' and '.join(NAMES[lib] for lib in verified)} report it)", flush=True)
    for lib in unverifiable:
        print(f"kernels-down: {lib} names no kernels on this CPU ({host[lib]!r}): its switch is set, unverified",
              flush=True)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "kernels and not slow", *pytest_args],
                          env=forced_env)
    print(f"kernels-down: pass took {time.monotonic() - start:.0f} s at {level['aten']}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
