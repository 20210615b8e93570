#!/usr/bin/env bash
# One clang-format style (.clang-format) for the whole tree: lists every tracked C++/CUDA file that clang-format would
# change and fails if there is any. Fix with: git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' | xargs clang-format -i
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
bad=0
while IFS= read -r f; do
  if ! clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then
    echo "not clang-format clean: $f"
    bad=1
  fi
done < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')
exit $bad
