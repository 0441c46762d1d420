"""The way one variant takes through the builder's modules: `vlmbuild ARGS...` run in this process under a
profiler that records every call from one vlmbuild module into another.

    python benchmarks/trace_path.py [--reads] build vlm-r1 --variant local

Prints the path (the modules in the order they are entered, a module entered again from where it was called
shown again) and, per module, how many times it was entered by a call from another module. Helpers every
module uses (progress, contract, errors, the engine's types, the base families' data) are not steps of the
path and are left out; so are calls inside one module, returns to a caller, and the methods and properties of
the values passed along (dataclasses: a Variant's tag, a Lockfile's pins), which are reads, not steps.

With --reads those reads are followed too: a property or method of a value defined in another module counts as
entering that module (a Lockfile's pins computed again, a Variant's tag derived again), so a value computed once
and then read shows as one stay, and one derived again wherever it is needed shows as many. The last line counts
stays (the steps of the path) and returns (steps into a module the path had already left).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

HELPERS = {"vlmbuild.progress", "vlmbuild.contract", "vlmbuild.errors", "vlmbuild.engine_api", "vlmbuild.bases",
           "vlmbuild.bases.debian", "vlmbuild"}


# Modules split out of one file count as that file, so that a path before the split and one after compare.
SPLIT_FROM = {"vlmbuild.spec_model": "vlmbuild.spec", "vlmbuild.spec_checker": "vlmbuild.spec",
              "vlmbuild.cli_engine": "vlmbuild.cli"}


def module_of(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    if name == "vlmbuild" or name.startswith("vlmbuild."):
        return SPLIT_FROM.get(name, name)
    return None


def main() -> int:
    from vlmbuild.cli import main as cli

    args = sys.argv[1:]
    reads = "--reads" in args[:1]
    if reads:
        args = args[1:]

    path: list[str] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = module_of(frame)
        caller = module_of(frame.f_back) if frame.f_back else None
        if callee is None or callee in HELPERS or callee == caller:
            return
        if frame.f_code.co_name.startswith("<") and frame.f_code.co_name != "<module>":
            return  # comprehensions and lambdas: not an entry
        owner = frame.f_locals.get("self")
        if owner is not None and dataclasses.is_dataclass(owner) and not reads:
            return  # a value's method or property: a read, not a step
        if caller is None and path:
            return  # called back from a library (click, jinja2): not a step of ours
        if not path or path[-1] != callee:
            path.append(callee)

    sys.setprofile(profile)
    try:
        cli(args, standalone_mode=False)
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    entries = Counter(path)
    short = [m.removeprefix("vlmbuild.") for m in path]
    print(f"path ({len(path)} steps): " + " -> ".join(short))
    print("entries per module: " + ", ".join(f"{m.removeprefix('vlmbuild.')} {n}" for m, n in entries.most_common()))
    again = {m: n for m, n in entries.items() if n > 1}
    print(f"{len(entries)} modules; {len(again)} entered more than once; most: {max(entries.values())}")
    print(f"{'with reads: ' if reads else ''}{len(path)} stays, {len(path) - len(entries)} returns to a module "
          "already left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
