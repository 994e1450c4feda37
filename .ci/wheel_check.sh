#!/usr/bin/env bash
# CI: the built wheel installs ONE top-level package, diffedit_engine, and lives beside Hugging Face's
# `kernels` package (transformers >= 5.25 depends on it) without touching it: installing and uninstalling
# our wheel leaves kernels/__init__.py byte for byte as it was, and both import from outside the checkout.
#
#   bash .ci/wheel_check.sh        # one line per check; exit status 1 on the first failure
#
# It builds from a copy of the checkout's files (tracked + untracked, not ignored), so a stale build/ or
# egg-info folder in the tree cannot leak into the wheel, and installs into a throw-away venv that gets the
# pinned CPU torch first (`torch==2.13.0`, repeated on every later install so nothing pulls a CUDA build).
# pip's cache is reused and nothing is byte-compiled (a throw-away venv); PYTHON picks the interpreter.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/diffedit_wheel_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/log"
T0=$SECONDS

ok() { echo "wheel_check: ok    $*  [$((SECONDS - T0)) s]"; : >"$LOG"; }  # a later failure shows only its own output
fail() {
    echo "wheel_check: FAIL  $*"
    if [ -s "$LOG" ]; then echo "---- last output ----"; tail -n 30 "$LOG"; fi
    exit 1
}
# run a command quietly; on failure show its output and stop
quiet() { "$@" >"$LOG" 2>&1; }

# 1. build the wheel from a clean copy of the checkout
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/outside"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
    (cd "$REPO" && tar --exclude=./.venv --exclude=./build --exclude='*.egg-info' -cf - .) | tar -xf - -C "$WORK/src"
fi
quiet "$PY" -m pip wheel --no-deps -w "$WORK/dist" "$WORK/src" || fail "build the wheel (pip wheel --no-deps)"
WHEEL=$(ls "$WORK"/dist/diffedit_engine-*.whl 2>/dev/null | head -n 1)
[ -n "$WHEEL" ] || fail "build the wheel: no dist/diffedit_engine-*.whl"
ok "built $(basename "$WHEEL")"

# 2. its top-level names: diffedit_engine and its dist-info, nothing else
TOP=$("$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
print(" ".join(sorted({n.split("/", 1)[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()})))
EOF
)
BAD=$(for n in $TOP; do case "$n" in diffedit_engine|diffedit_engine-*.dist-info) ;; *) echo "$n";; esac; done)
[ -z "$BAD" ] || fail "wheel top-level names are [$TOP]: unexpected $(echo $BAD)"
case " $TOP " in *" diffedit_engine "*) ;; *) fail "wheel has no diffedit_engine package: [$TOP]";; esac
ok "wheel top level: $TOP"
MISSING=$("$PY" - "$WHEEL" "$WORK/src" <<'EOF'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["diffedit_engine/cli.py", "diffedit_engine/engine/__init__.py", "diffedit_engine/engine/edit/diffedit.py",
        "diffedit_engine/kernels/fusion.py", "diffedit_engine/weights/model.py",
        "diffedit_engine/weights/data/bpe_simple_vocab_16e6.txt.gz", "diffedit_engine/engine/data/chelsea.png"]
# every data file of the checkout ships (the CLIP vocabulary, the sample image, the shapes model once it exists)
src = pathlib.Path(sys.argv[2])
need += [f"diffedit_engine/{p.relative_to(src).as_posix()}" for d in ("weights/data", "engine/data")
         for p in sorted((src / d).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
print(" ".join(n for n in need if n not in names))
print(" ".join(sorted({n for n in names if n.startswith(("diffedit_engine/tests/", "diffedit_engine/benchmarks/"))}))[:200])
EOF
)
[ -z "$(echo "$MISSING" | sed -n 1p)" ] || fail "wheel lacks $(echo "$MISSING" | sed -n 1p)"
[ -z "$(echo "$MISSING" | sed -n 2p)" ] || fail "wheel ships tests/benchmarks: $(echo "$MISSING" | sed -n 2p)"
ok "wheel has the modules and every file of weights/data/ and engine/data/; no tests/benchmarks"

# 3. a second fresh venv: CPU torch, then transformers >= 5.25, which brings Hugging Face's kernels
quiet "$PY" -m venv "$WORK/venv" || fail "create a fresh venv"
VPY="$WORK/venv/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)
quiet "${PIP[@]}" install --no-compile "$TORCH_PIN" || fail "pip install $TORCH_PIN"
quiet "${PIP[@]}" install --no-compile "transformers>=5.25" "$TORCH_PIN" || fail "pip install 'transformers>=5.25' $TORCH_PIN"
quiet "${PIP[@]}" show kernels || fail "pip show kernels: transformers did not bring Hugging Face's kernels"
VERS=$("$VPY" -c "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'kernels')))")
case "$VERS" in "torch 2.13.0"*) ;; *) fail "torch is no longer 2.13.0 after transformers: $VERS";; esac
ok "fresh venv: $VERS"
KINIT=$(cd "$WORK/outside" && "$VPY" -c "import importlib.util; print(importlib.util.find_spec('kernels').origin)")
case "$KINIT" in "$WORK/venv/"*/site-packages/kernels/__init__.py) ;; *) fail "kernels resolves to $KINIT";; esac
sha() { sha256sum "$KINIT" | cut -d' ' -f1; }
SHA0=$(sha)
ok "Hugging Face kernels/__init__.py sha256 ${SHA0:0:16}..."

# 4. install our wheel (its dependencies too, torch kept at the pin)
quiet "${PIP[@]}" install --no-compile "$WHEEL" "$TORCH_PIN" || fail "pip install $(basename "$WHEEL")"
[ "$(sha)" = "$SHA0" ] || fail "installing our wheel changed site-packages/kernels/__init__.py"
ok "installed our wheel; kernels/__init__.py unchanged"

# 5. from a folder outside the checkout: the console script and both packages import
cd "$WORK/outside"
unset PYTHONPATH
quiet "$WORK/venv/bin/diffedit" --help || fail "diffedit --help"
grep -q "edit" "$LOG" || fail "diffedit --help does not list the edit command"
ok "diffedit --help (console script, run from $WORK/outside)"
quiet "$VPY" -c "import transformers.integrations.hub_kernels; from kernels import get_kernel" \
    || fail "import transformers.integrations.hub_kernels; from kernels import get_kernel"
ok "import transformers.integrations.hub_kernels; from kernels import get_kernel"
quiet "$VPY" -c "from diffedit_engine.weights import load_model; from diffedit_engine.engine import diffedit, regions, compat; from diffedit_engine.kernels import fusion, noise_diff" \
    || fail "import the public API (diffedit_engine.weights / .engine / .kernels)"
ok "from diffedit_engine.weights import load_model; from diffedit_engine.engine import diffedit, regions, compat; from diffedit_engine.kernels import fusion, noise_diff"
WHERE=$("$VPY" -c "import diffedit_engine.engine.edit.diffedit as d, kernels as k; print(d.__file__); print(k.__file__)")
case "$(echo "$WHERE" | sed -n 1p)" in "$WORK/venv/"*/site-packages/diffedit_engine/*) ;; *) fail "diffedit_engine imports from $(echo "$WHERE" | sed -n 1p), not the venv";; esac
[ "$(echo "$WHERE" | sed -n 2p)" = "$KINIT" ] || fail "kernels imports from $(echo "$WHERE" | sed -n 2p), not $KINIT"
ok "diffedit_engine from the venv's site-packages, kernels still Hugging Face's"

# 6. uninstall ours: Hugging Face's kernels stays, byte for byte, and imports
quiet "${PIP[@]}" uninstall -y diffedit-engine || fail "pip uninstall -y diffedit-engine"
! "$VPY" -c "import diffedit_engine.engine" >/dev/null 2>&1 || fail "diffedit_engine still importable after uninstall"
[ -f "$KINIT" ] || fail "uninstalling our wheel removed site-packages/kernels/__init__.py"
[ "$(sha)" = "$SHA0" ] || fail "uninstalling our wheel changed site-packages/kernels/__init__.py"
ok "uninstalled diffedit-engine; kernels/__init__.py sha256 unchanged"
quiet "$VPY" -c "from kernels import get_kernel" || fail "from kernels import get_kernel after the uninstall"
ok "from kernels import get_kernel after the uninstall"
echo "wheel_check: all checks passed in $((SECONDS - T0)) s"
