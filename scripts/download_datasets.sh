#!/usr/bin/env bash
# Fetch the real benchmark data into the layouts the loaders read (docs/benchmarks.md).
#
#   scripts/download_datasets.sh [clotho|mmau-pro|all] [--dest DIR] [--clotho-splits evaluation,validation]
#                                [--keep-archives]
#
#   clotho    Clotho v2.1 from Zenodo record 4783391 (~2 GB for the evaluation split)
#             -> DIR/clotho-v2/clotho_captions_<split>.csv, clotho_metadata_<split>.csv, <split>/*.wav
#   mmau-pro  Hugging Face dataset gamma-lab-umd/MMAU-Pro (gated: accept its terms on the dataset page,
#             then export HF_TOKEN or `huggingface-cli login`); data.zip is ~47.5 GB, unpacked as big again
#             -> DIR/mmau-pro/test.parquet, test.jsonl (converted when a python with pyarrow is found),
#                data/*.wav
#
# DIR defaults to <repo>/data, where the registry's default sources (data/clotho-v2, data/mmau-pro) point.
# Downloads resume (curl -C -), Clotho files are checked against their published md5 sums, and a step
# whose output is already there is skipped, so re-running after a failure continues where it stopped.
#
# UNVERIFIED HERE: written from the Zenodo and Hugging Face file lists and public download scripts on a
# machine without internet access, and never run in CI. Needs curl and md5sum; 7z (p7zip) for Clotho;
# unzip for MMAU-Pro.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/data"
WHAT=""
CLOTHO_SPLITS="evaluation"
KEEP_ARCHIVES=0
ZENODO="https://zenodo.org/records/4783391/files"
HF_REPO="https://huggingface.co/datasets/gamma-lab-umd/MMAU-Pro/resolve/main"

die() { echo "download_datasets.sh: $*" >&2; exit 1; }
say() { echo "download_datasets.sh: $*" >&2; }
usage() { sed -n '4,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        clotho|mmau-pro|all) [ -z "$WHAT" ] || usage; WHAT=$1 ;;
        --dest) [ $# -ge 2 ] || usage; DEST=$2; shift ;;
        --dest=*) DEST=${1#--dest=} ;;
        --clotho-splits) [ $# -ge 2 ] || usage; CLOTHO_SPLITS=$2; shift ;;
        --keep-archives) KEEP_ARCHIVES=1 ;;
        -h|--help) usage ;;
        *) say "unknown argument: $1"; usage ;;
    esac
    shift
done
[ -n "$WHAT" ] || WHAT=all
for split in ${CLOTHO_SPLITS//,/ }; do
    case "$split" in
        development|validation|evaluation) ;;
        *) die "--clotho-splits: unknown split '$split' (development, validation, evaluation)" ;;
    esac
done
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

need() {  # need TOOL HOW-TO-INSTALL
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found; $2"
}

# fetch URL OUT [curl args...]: resumable download to OUT.part, renamed when complete.
fetch() {
    local url=$1 out=$2; shift 2
    if [ -s "$out" ]; then say "have $(basename "$out")"; return; fi
    say "fetching $url"
    curl -fL --retry 5 --retry-delay 10 --connect-timeout 30 -C - "$@" -o "$out.part" "$url" \
        || die "download failed: $url (re-run to resume; a 401/403 from Hugging Face means HF_TOKEN is missing or the dataset's terms are not accepted)"
    mv "$out.part" "$out"
}

check_md5() {  # check_md5 FILE MD5
    local got
    got=$(md5sum "$1" | cut -d' ' -f1)
    [ "$got" = "$2" ] || die "$1: md5 $got, expected $2 (a damaged download: delete it and re-run)"
}

clotho_md5() {
    case "$1" in
        clotho_audio_development.7z) echo c8b05bc7acdb13895bb3c6a29608667e ;;
        clotho_audio_validation.7z) echo 7dba730be08bada48bd15dc4e668df59 ;;
        clotho_audio_evaluation.7z) echo 4569624ccadf96223f19cb59fe4f849f ;;
        clotho_captions_development.csv) echo d4090b39ce9f2491908eebf4d5b09bae ;;
        clotho_captions_validation.csv) echo 5879e023032b22a2c930aaa0528bead4 ;;
        clotho_captions_evaluation.csv) echo 1b16b9e57cf7bdb7f13a13802aeb57e2 ;;
        clotho_metadata_development.csv) echo 170d20935ecfdf161ce1bb154118cda5 ;;
        clotho_metadata_validation.csv) echo 2e010427c56b1ce6008b0f03f41048ce ;;
        clotho_metadata_evaluation.csv) echo 13946f054d4e1bf48079813aac61bf77 ;;
        *) die "no md5 known for $1" ;;
    esac
}

download_clotho() {
    local dir="$DEST/clotho-v2" sevenz="" split name
    need curl "install curl (apt-get install curl)"
    need md5sum "install coreutils"
    for c in 7z 7za 7zz; do command -v "$c" >/dev/null 2>&1 && { sevenz=$c; break; }; done
    [ -n "$sevenz" ] || die "no 7z, 7za or 7zz found; install p7zip (apt-get install p7zip-full, brew install p7zip) to unpack the Clotho .7z archives"
    mkdir -p "$dir"
    for split in ${CLOTHO_SPLITS//,/ }; do
        for name in "clotho_captions_$split.csv" "clotho_metadata_$split.csv"; do
            fetch "$ZENODO/$name?download=1" "$dir/$name"
            check_md5 "$dir/$name" "$(clotho_md5 "$name")"
        done
        # The archive holds a top-level <split>/ folder: `7z x` into the root gives <root>/<split>/*.wav.
        if [ -d "$dir/$split" ] && [ -n "$(ls -A "$dir/$split")" ]; then
            say "have $dir/$split/"
        else
            name="clotho_audio_$split.7z"
            fetch "$ZENODO/$name?download=1" "$dir/$name"
            check_md5 "$dir/$name" "$(clotho_md5 "$name")"
            "$sevenz" x -y -o"$dir" "$dir/$name" >/dev/null || die "$sevenz could not unpack $dir/$name"
            [ -d "$dir/$split" ] || die "$dir/$name did not unpack to $dir/$split/; see docs/benchmarks.md for the layouts the loader accepts"
            [ "$KEEP_ARCHIVES" = 1 ] || rm -f "$dir/$name"
        fi
        say "clotho $split: $(find "$dir/$split" -name '*.wav' | wc -l) wav files in $dir/$split"
    done
}

hf_token() {
    if [ -n "${HF_TOKEN:-}" ]; then echo "$HF_TOKEN"; return; fi
    cat "${HF_HOME:-$HOME/.cache/huggingface}/token" 2>/dev/null || true
}

# A python that can read parquet: the stage venvs first, then python3.
parquet_python() {
    local py
    for py in "$ROOT/.venvs/inference/bin/python" "$ROOT/.venvs/daemon/bin/python" python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import pyarrow.parquet" >/dev/null 2>&1; then
            echo "$py"; return
        fi
    done
}

download_mmau_pro() {
    local dir="$DEST/mmau-pro" token free_kb py
    need curl "install curl (apt-get install curl)"
    need unzip "install unzip (apt-get install unzip)"
    token=$(hf_token)
    [ -n "$token" ] || die "MMAU-Pro is a gated Hugging Face dataset: accept its terms at https://huggingface.co/datasets/gamma-lab-umd/MMAU-Pro, then export HF_TOKEN=<token> (or huggingface-cli login)"
    mkdir -p "$dir"
    fetch "$HF_REPO/test.parquet" "$dir/test.parquet" -H "Authorization: Bearer $token"
    if [ -d "$dir/data" ] && [ -n "$(ls -A "$dir/data")" ]; then
        say "have $dir/data/"
    else
        free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
        [ "${free_kb:-0}" -ge 100000000 ] || say "warning: $(( ${free_kb:-0} / 1000000 )) GB free in $dir; data.zip (~47.5 GB) and its contents need ~95 GB"
        fetch "$HF_REPO/data.zip" "$dir/data.zip" -H "Authorization: Bearer $token"
        # audio_path entries read data/<uuid>.wav: the zip's top-level data/ folder lands beside test.parquet.
        unzip -q -n "$dir/data.zip" -d "$dir" || die "unzip could not unpack $dir/data.zip"
        [ -d "$dir/data" ] || die "$dir/data.zip did not unpack to $dir/data/"
        [ "$KEEP_ARCHIVES" = 1 ] || rm -f "$dir/data.zip"
    fi
    say "mmau-pro: $(find "$dir/data" -type f | wc -l) audio files in $dir/data"
    # The loader reads JSONL with the standard library; parquet only where pyarrow is installed.
    py=$(parquet_python)
    if [ -z "$py" ]; then
        say "warning: no python with pyarrow found; test.jsonl not written (the loader then needs pyarrow to read test.parquet)"
    elif [ ! -s "$dir/test.jsonl" ] || [ "$dir/test.parquet" -nt "$dir/test.jsonl" ]; then
        "$py" - "$dir/test.parquet" "$dir/test.jsonl" <<'EOF'
import json, os, sys
import pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()
with open(sys.argv[2] + ".tmp", "w", encoding="utf-8") as f:
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
print(f"download_datasets.sh: wrote {len(rows)} rows to {sys.argv[2]}", file=sys.stderr)
EOF
    fi
}

case "$WHAT" in
    clotho) download_clotho ;;
    mmau-pro) download_mmau_pro ;;
    all) download_clotho; download_mmau_pro ;;
esac
say "done: $DEST"
