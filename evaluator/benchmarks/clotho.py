"""Clotho-v2 (v2.1, Zenodo record 4783391) audio captioning: one clip -> five reference captions.

Layout (`source` is the directory; the captions CSV itself may be given instead):

    <root>/clotho_captions_<split>.csv     file_name,caption_1,...,caption_5 (CSV quoting: captions hold
                                            commas and quotes)
    <root>/<split>/<file_name>             what `7z x clotho_audio_<split>.7z` unpacks (the archive holds a
                                            top-level <split>/ folder)

Also found: the captions CSV in `<root>/clotho_csv_files/` and the audio in `<root>/clotho_audio_<split>/`
(`7z e` flattening into a folder named after the archive), `<root>/audio/<split>/`, or
`<root>/clotho_audio_files/<split>/` (aac-datasets; also under `<root>/CLOTHO_v2.1/`). The first audio
folder that exists is used, or `options.audio_dir`. Audio is only checked to exist; decoding is the
inference backend's job. Captions are kept raw: tokenisation is the metric's job.
"""
from __future__ import annotations

import csv
import os

from .dataset import Dataset, DatasetError, Sample, raise_problems

SPLITS = {"evaluation": "evaluation", "eval": "evaluation", "development": "development", "dev": "development",
          "validation": "validation", "val": "validation"}
PROMPT = "Describe the audio in one sentence."
CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))
METRICS = ("cider_d", "spider", "fense", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "sbert_sim")
# Where the captions CSV and the audio folder may live, relative to the root; first found wins.
CSV_DIRS = ("", "clotho_csv_files", os.path.join("CLOTHO_v2.1", "clotho_csv_files"))
AUDIO_DIRS = ("{split}", "clotho_audio_{split}", os.path.join("audio", "{split}"),
              os.path.join("clotho_audio_files", "{split}"),
              os.path.join("CLOTHO_v2.1", "clotho_audio_files", "{split}"))


def _split(options: dict) -> str:
    split = str(options.get("split", "evaluation"))
    if split not in SPLITS:
        raise DatasetError(f"options.split: expected one of evaluation, development, validation "
                           f"(or eval, dev, val), got {split!r}")
    return SPLITS[split]


def find_captions(source: str, split: str) -> tuple[str, str]:
    """(captions CSV, root directory) for `source`, a Clotho directory or the CSV itself."""
    source = os.path.abspath(source)
    if os.path.isfile(source):
        return source, os.path.dirname(source)
    name = f"clotho_captions_{split}.csv"
    tried = [os.path.join(source, d, name) for d in CSV_DIRS]
    for path in tried:
        if os.path.isfile(path):
            return path, source
    raise DatasetError(f"{source}: no Clotho captions file for split {split!r}; looked for "
                       f"{', '.join(tried)} (fetch it with scripts/download_datasets.sh clotho)")


def find_audio_dir(root: str, csv_path: str, split: str, options: dict) -> str:
    if options.get("audio_dir"):
        audio_dir = os.path.join(root, options["audio_dir"])
        if not os.path.isdir(audio_dir):
            raise DatasetError(f"options.audio_dir: {audio_dir}: not a directory")
        return audio_dir
    bases = [root] + ([os.path.dirname(csv_path)] if os.path.dirname(csv_path) != root else [])
    tried = [os.path.join(base, d.format(split=split)) for base in bases for d in AUDIO_DIRS]
    for path in tried:
        if os.path.isdir(path):
            return path
    raise DatasetError(f"{csv_path}: no audio folder for split {split!r}; looked for {', '.join(tried)} "
                       f"(unpack clotho_audio_{split}.7z there with `7z x`, or set options.audio_dir)")


def _records(path: str, encoding: str):
    """(first line of the record, fields) for each CSV record; a quoted caption may span lines."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.reader(f)
            start = 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if fields:
                    yield line, fields
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not {encoding} text (byte {e.start}: {e.reason}); "
                           "set options.encoding") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable CSV file ({e})") from None


def load(source: str, options: dict) -> Dataset:
    """Clotho-v2 captions CSV + audio folder -> one sample per clip: audio + prompt, five references."""
    split = _split(options)
    csv_path, root = find_captions(source, split)
    audio_dir = find_audio_dir(root, csv_path, split, options)
    prompt = str(options.get("prompt", PROMPT))
    records = _records(csv_path, options.get("encoding", "utf-8-sig"))
    header_line, header = next(records, (1, []))
    header = [h.strip() for h in header]
    missing = [c for c in ("file_name",) + CAPTION_COLUMNS if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}:{header_line}: header lacks {', '.join(missing)} "
                           f"(expected file_name,caption_1,...,caption_5; got {','.join(header)})")
    samples, problems, seen = [], [], {}
    for line, fields in records:
        where = f"{csv_path}:{line}"
        if len(fields) != len(header):
            problems.append(f"{where}: {len(fields)} fields, the header has {len(header)}; "
                            "a comma inside a caption needs \"quotes\"")
            continue
        row = dict(zip(header, fields))
        file_name = row["file_name"].strip()
        references = [row[c] for c in CAPTION_COLUMNS if row[c].strip()]
        if not file_name:
            problems.append(f"{where}: file_name is empty")
            continue
        if not references:
            problems.append(f"{where}: {file_name}: no captions")
            continue
        if file_name in seen:
            problems.append(f"{where}: {file_name} already listed on line {seen[file_name]}")
            continue
        seen[file_name] = line
        audio = os.path.join(audio_dir, file_name)
        if not os.path.isfile(audio):
            problems.append(f"{where}: audio file not found: {audio}")
            continue
        samples.append(Sample(
            id=file_name, references=references, metadata={"source_line": line},
            messages=[{"role": "user", "content": [{"type": "audio", "path": audio},
                                                   {"type": "text", "text": prompt}]}]))
    if problems:
        raise_problems(problems, csv_path)
    if not samples:
        raise DatasetError(f"{csv_path}: no rows")
    metadata = {"dataset_id": f"clotho-v2-{split}", "name": f"Clotho v2.1 ({split})", "version": "2.1",
                "task_type": "captioning", "metrics": list(METRICS), "prompt": prompt, "split": split,
                "source": csv_path, "audio_dir": audio_dir}
    return Dataset(root=root, metadata=metadata, samples=samples)
