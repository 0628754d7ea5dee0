"""A process that has imported what a benchmark's cells import and forks one fresh child per cell.

Every cell must run in a process of its own (its peak memory is then its own), and starting Python with torch,
Lightning, diffusers and transformers costs about 11 s of CPU on the 2-core machine, more than most tiny cells
measure. ``python -m benchmarks.zygote SUITE-FLAGS`` imports them once (the suite's ``preload``: exactly the
modules each cell imports before its memory baseline anyway), runs no torch operation (a forked child must not
inherit a started OpenMP team), then serves one request per line on stdin: ``{"argv": [...], "out": PATH, "err":
PATH}``. For each it forks; the child runs ``python -m benchmarks ARGV`` as a fresh interpreter would, its stdout
and stderr in the two files, and the zygote answers ``{"returncode": N}`` (negative: the signal that killed it).

Used with ``--fork`` (the tests use it; the README's figures come from new interpreters). Linux starts a forked
child's peak RSS (``ru_maxrss``) at the resident set it inherits, but does not map a shared library's file pages
into the child until it touches them, so a forked cell's "after build" and peak read lower than a new
interpreter's (~70 MiB for a tiny SD model on a CPU), alike for ours and the peer's rows. The parent
(``harness.spawn``) starts one zygote per environment and job slot.
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def serve(argv: list[str]) -> None:
    from benchmarks.cli import SUITES, main, parse_args
    args = parse_args(argv)
    preload = getattr(SUITES[args.suite], "preload", None)
    if preload:
        preload(args)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the cell's process
            code = 1
            try:
                for fd, path in ((1, request["out"]), (2, request["err"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
                sys.argv = ["benchmarks", *request["argv"]]
                code = main(request["argv"]) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported as a plain interpreter would, on stderr
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
