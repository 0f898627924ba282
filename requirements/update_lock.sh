#!/usr/bin/env bash
# Move the pins forward: resolve setup.py's ranges (with the test extras) afresh in a brand-new virtual environment,
# write requirements/lock.txt from what got installed, then run the whole suite on exactly those versions (.ci/run).
#   bash requirements/update_lock.sh              # keep the pinned torch, re-resolve everything else
#   bash requirements/update_lock.sh 2.14.1       # also move torch
# Review `git diff requirements/lock.txt` and commit it with the green suite. The lock is written only once the new
# environment passes `pip check`; a red suite leaves the new lock in place for you to fix or `git checkout`.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements/lock.txt
torch_version=${1:-$(sed -n 's/^torch==//p' "$lock")}

work=$(mktemp -d)
trap 'rm -rf "$work" "$lock.new"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --progress-bar off --upgrade pip setuptools
"$py" -m pip install --quiet --progress-bar off "torch==$torch_version"
"$py" -m pip install --quiet --progress-bar off -e ".[test]"
"$py" -m pip check

# keep the header, replace the pins; torch by its public version (a CPU or CUDA build of it satisfies the pin)
{
  sed -n '/^#/!q;p' "$lock"
  "$py" -m pip freeze --all --exclude-editable | grep -v '^#' | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > "$lock.new"
mv "$lock.new" "$lock"
git --no-pager diff --stat -- "$lock" || true

# the suite on exactly the new pins, in a fresh environment of its own
rm -rf .venv
bash .ci/run
