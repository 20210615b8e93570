#!/usr/bin/env python3
"""Checks that every source file includes only headers of its own library target or of the targets it links.

The targets and what each links are those of the CMakeLists files (runtime/CMakeLists.txt explains the layering);
a static library does not fail to build when it includes a header of a target it does not link, so this check is
what makes the include direction a rule rather than a habit. It runs as the ctest `include_layering`.

Usage: scripts/check_layering.py [REPO]   (exit 1 and one line per offending include)
"""
import re
import sys
from pathlib import Path

# Target: the folders whose sources it builds. The longest matching folder decides a file's target.
FOLDERS = {
    "kiln_base": ["runtime/core", "runtime/io"],
    "kiln_tokenizer": ["runtime/text/tokenizer"],
    "kiln_jinja": ["runtime/text/jinja"],
    "kiln_runtime": ["runtime/backend", "runtime/cpu", "runtime/cuda", "runtime/kv", "runtime/model",
                     "runtime/sampling", "runtime/workspace", "runtime/engine"],
    "kiln_serve": ["runtime/serve", "runtime/bench"],
    "kiln_convert": ["convert"],
    "kiln_calib": ["calib"],
    "kiln_quant": ["quant"],
    "kiln": ["tools"],
}
# Target: the targets it links (directly or through them), as in the CMakeLists files.
LINKS = {
    "kiln_base": [],
    "kiln_tokenizer": ["kiln_base"],
    "kiln_jinja": ["kiln_tokenizer"],
    "kiln_runtime": ["kiln_tokenizer"],
    "kiln_serve": ["kiln_runtime", "kiln_jinja"],
    "kiln_convert": ["kiln_runtime", "kiln_jinja"],
    "kiln_calib": ["kiln_runtime"],
    "kiln_quant": ["kiln_calib"],
    "kiln": ["kiln_quant", "kiln_convert", "kiln_serve"],
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
SUFFIXES = {".h", ".cpp", ".cu", ".cuh"}


def reachable(target):
    seen, todo = set(), [target]
    while todo:
        t = todo.pop()
        if t not in seen:
            seen.add(t)
            todo.extend(LINKS[t])
    return seen


def target_of(path):
    best = None
    for target, folders in FOLDERS.items():
        for folder in folders:
            if (path == folder or path.startswith(folder + "/")) and (best is None or len(folder) > len(best[1])):
                best = (target, folder)
    return best[0] if best else None


def main():
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    bad = []
    for src in sorted(repo.rglob("*")):
        rel = src.relative_to(repo).as_posix()
        if src.suffix not in SUFFIXES or rel.startswith(("build", "tests/")):
            continue
        target = target_of(rel)
        if target is None:
            continue
        allowed = reachable(target)
        for header in INCLUDE.findall(src.read_text(encoding="utf-8", errors="replace")):
            owner = target_of(header)
            if owner is not None and owner not in allowed:
                bad.append(f"{rel}: includes {header} of {owner}, which {target} does not link")
    for line in bad:
        print(line)
    if bad:
        sys.exit(1)
    print(f"include layering: every include is within its target's links ({len(FOLDERS)} targets)")


if __name__ == "__main__":
    main()
