"""Benchmark loaders: source layouts (Clotho-v2, MMAU-Pro, MMLU/KMMLU, QA files) -> canonical samples.

Every source is written here in the exact layout the real one has (tiny WAVs from the stdlib `wave`
module), then loaded through registry.load_benchmark, the way the stages and tools/bench.py load them.
"""
from __future__ import annotations

import json
import os
import sys
import wave

import pytest

from evaluator.benchmarks import registry
from evaluator.benchmarks.dataset import DatasetError, load_dataset, write_dataset

CLOTHO_HEADER = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"


def write_wav(path, seconds=0.05, rate=16000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return str(path)


def audio_parts(sample):
    return [p["path"] for p in sample.messages[-1]["content"] if p["type"] == "audio"]


def text_part(sample):
    content = sample.messages[-1]["content"]
    return content if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"][0]


def assert_canonical(dataset, tmp_path):
    """What a loader returns writes out and reads back as a valid canonical dataset."""
    out = tmp_path / "canonical"
    write_dataset(str(out), dataset.metadata, dataset.samples)
    again = load_dataset(str(out))
    assert [s.to_dict() for s in again.samples] == [s.to_dict() for s in dataset.samples]


# --- Clotho-v2 ----------------------------------------------------------------------------------------------

# As in the real clotho_captions_evaluation.csv: quoted captions holding commas and doubled quotes.
CLOTHO_ROWS = (
    'Santa Motor.wav,"A machine whines and squeals while rhythmically punching or stamping.",'
    '"A person is using electric clippers to trim bushes.","Someone is trimming the bushes with electric '
    'clippers.","The whirring of a pump fills a bladder that turns a switch to reset everything.",'
    '"While rhythmically punching or stamping, a machine whines and squeals."\n'
    '"Radio Garble, 2.wav","A radio plays static, then a man says ""over"" twice.",b,c,d,e\n'
)


def make_clotho(root, split="evaluation", audio_dir=None, csv_dir="", rows=CLOTHO_ROWS, wavs=None):
    os.makedirs(root / csv_dir, exist_ok=True)
    (root / csv_dir / f"clotho_captions_{split}.csv").write_text(CLOTHO_HEADER + rows, encoding="utf-8")
    for name in wavs if wavs is not None else ("Santa Motor.wav", "Radio Garble, 2.wav"):
        write_wav(root / (audio_dir or split) / name)
    return root


def test_clotho_evaluation_split_gives_one_sample_per_clip_with_five_raw_captions(tmp_path):
    root = make_clotho(tmp_path / "clotho")
    ds = registry.load_benchmark("clotho", str(root))
    assert [s.id for s in ds.samples] == ["Santa Motor.wav", "Radio Garble, 2.wav"]
    garble = ds.samples[1]
    assert garble.references == ['A radio plays static, then a man says "over" twice.', "b", "c", "d", "e"]
    assert ds.samples[0].references[1] == "A person is using electric clippers to trim bushes."
    assert audio_parts(garble) == [str(root / "evaluation" / "Radio Garble, 2.wav")]
    assert text_part(garble) == "Describe the audio in one sentence."
    assert ds.metadata["dataset_id"] == "clotho-v2-evaluation"
    assert registry.default_metrics("clotho", ds)[:3] == ["cider_d", "spider", "fense"]
    assert_canonical(ds, tmp_path)


@pytest.mark.parametrize("audio_dir,csv_dir", [
    ("clotho_audio_evaluation", ""),                          # `7z e` into a folder named after the archive
    (os.path.join("audio", "evaluation"), ""),
    (os.path.join("clotho_audio_files", "evaluation"), "clotho_csv_files"),  # aac-datasets / DCASE baseline
])
def test_clotho_finds_the_audio_folder_of_other_unpack_layouts(tmp_path, audio_dir, csv_dir):
    root = make_clotho(tmp_path / "clotho", audio_dir=audio_dir, csv_dir=csv_dir)
    ds = registry.load_benchmark("clotho", str(root))
    assert audio_parts(ds.samples[0]) == [str(root / audio_dir / "Santa Motor.wav")]


def test_clotho_split_alias_prompt_option_and_csv_path_as_source(tmp_path):
    root = make_clotho(tmp_path / "clotho", split="validation")
    ds = registry.load_benchmark("clotho", str(root), {"split": "val", "prompt": "Caption this."})
    assert ds.metadata["split"] == "validation" and text_part(ds.samples[0]) == "Caption this."
    direct = registry.load_benchmark("clotho", str(root / "clotho_captions_validation.csv"), {"split": "val"})
    assert [s.id for s in direct.samples] == [s.id for s in ds.samples]


def test_clotho_missing_audio_file_is_reported_at_its_csv_line(tmp_path):
    # a caption spanning two lines (quoted newline) must not throw the line count off
    rows = CLOTHO_ROWS + '"Gone.wav","two\nlines",b,c,d,e\n'
    root = make_clotho(tmp_path / "clotho", rows=rows)
    with pytest.raises(DatasetError) as e:
        registry.load_benchmark("clotho", str(root))
    csv_path = root / "clotho_captions_evaluation.csv"
    assert f"{csv_path}:4: audio file not found: {root / 'evaluation' / 'Gone.wav'}" in str(e.value)


def test_clotho_unquoted_comma_row_and_bad_header_are_reported(tmp_path):
    root = make_clotho(tmp_path / "clotho", rows=CLOTHO_ROWS + "x.wav,one, two,b,c,d,e\n")
    with pytest.raises(DatasetError, match=r"clotho_captions_evaluation.csv:4: 7 fields, the header has 6"):
        registry.load_benchmark("clotho", str(root))
    (root / "clotho_captions_evaluation.csv").write_text("name,caption\nSanta Motor.wav,x\n")
    with pytest.raises(DatasetError, match=r"csv:1: header lacks file_name, caption_1"):
        registry.load_benchmark("clotho", str(root))


def test_clotho_without_captions_or_audio_folder_says_where_it_looked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no Clotho captions file for split 'evaluation'.*download_datasets"):
        registry.load_benchmark("clotho", str(tmp_path / "empty"))
    root = make_clotho(tmp_path / "clotho", wavs=[])
    with pytest.raises(DatasetError, match=r"no audio folder for split 'evaluation'; looked for .*7z x"):
        registry.load_benchmark("clotho", str(root))


def test_clotho_sample_size_keeps_the_first_rows(tmp_path):
    ds = registry.load_benchmark("clotho", str(make_clotho(tmp_path / "clotho")), sample_size=1)
    assert [s.id for s in ds.samples] == ["Santa Motor.wav"]


# --- MMAU-Pro -----------------------------------------------------------------------------------------------

def mmau_rows(root):
    for name in ("a1.wav", "a2.wav", "a3.wav", "a4.wav"):
        write_wav(root / "data" / name)
    return [
        {"id": "q1", "audio_path": ["data/a1.wav"], "question": "What is being prepared?",
         "choices": ["Boba tea", "Milk", "Coffee"], "answer": "Milk", "category": "sound",
         "length_type": "short", "perceptual_skills": ["Acoustic Source Characterization"]},
        {"id": "q2", "audio_path": ["data/a2.wav", "./data/a3.wav"], "question": "Which clip is louder?",
         "choices": ["The first", "The second"], "answer": "the second.", "category": "multi"},
        {"id": "q3", "audio_path": ["data/a4.wav"], "question": "Describe the scene.", "choices": [],
         "answer": "A busy street.", "category": "open"},
        {"id": "q4", "audio_path": ["data/a4.wav"], "question": "Name the instrument.", "choices": None,
         "answer": "A violin.", "category": "music"},
        {"id": "q5", "audio_path": ["data/a1.wav"], "question": "Answer in all capitals.", "choices": [],
         "answer": "", "category": "instruction following", "task_identifier": "All Uppercase", "kwargs": {}},
    ]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_mmau_pro_multiple_choice_rows_with_lettered_prompt_and_clips_in_order(tmp_path, capsys):
    root = tmp_path / "mmau-pro"
    write_jsonl(root / "test.jsonl", mmau_rows(root))
    ds = registry.load_benchmark("mmau-pro", str(root))
    assert [s.id for s in ds.samples] == ["q1", "q2"]
    q1, q2 = ds.samples
    assert text_part(q1) == "What is being prepared?\n\nA. Boba tea\nB. Milk\nC. Coffee"  # NeMo-Skills' prompt
    assert (q1.target, q1.choices, q1.category, q1.metadata["letter"]) == ("Milk", ["Boba tea", "Milk", "Coffee"],
                                                                          "sound", "B")
    assert q1.metadata["perceptual_skills"] == ["Acoustic Source Characterization"]
    assert audio_parts(q2) == [str(root / "data" / "a2.wav"), str(root / "data" / "a3.wav")]
    assert q2.messages[0]["content"][-1]["type"] == "text"
    assert (q2.target, q2.metadata["letter"]) == ("The second", "B")  # answer matched ignoring case/period
    assert ds.metadata["skipped"] == {"open": 2, "instruction": 1}
    assert "2 mc rows loaded; skipped 1 instruction, 2 open" in capsys.readouterr().err
    assert registry.default_metrics("mmau-pro", ds) == ["mmau_pro_embed", "mmau_string_match"]
    assert_canonical(ds, tmp_path)


def test_mmau_pro_open_task_takes_open_category_and_choiceless_rows(tmp_path):
    root = tmp_path / "mmau-pro"
    write_jsonl(root / "test.jsonl", mmau_rows(root))
    ds = registry.load_benchmark("mmau-pro", str(root), {"task": "open"})
    assert [(s.id, s.target, s.choices) for s in ds.samples] == [("q3", "A busy street.", None),
                                                                  ("q4", "A violin.", None)]
    assert text_part(ds.samples[0]) == "Describe the scene."
    assert ds.metadata["dataset_id"] == "mmau-pro-open"
    assert registry.default_metrics("mmau-pro", ds) == ["mmau_pro_judge"]


def test_mmau_pro_answer_not_among_choices_fails_at_its_line_or_is_skipped_when_asked(tmp_path):
    root = tmp_path / "mmau-pro"
    rows = mmau_rows(root)
    rows[1]["answer"] = "Neither"
    path = write_jsonl(root / "test.jsonl", rows)
    with pytest.raises(DatasetError, match=rf"{path}:2: answer 'Neither' is not one of the choices"):
        registry.load_benchmark("mmau-pro", str(root))
    ds = registry.load_benchmark("mmau-pro", str(root), {"bad_answer": "skip"})
    assert [s.id for s in ds.samples] == ["q1"] and ds.metadata["skipped"]["bad_answer"] == 1


def test_mmau_pro_json_list_reports_missing_audio_and_duplicate_ids_at_their_lines(tmp_path):
    root = tmp_path / "mmau-pro"
    rows = mmau_rows(root)[:2]
    rows[1]["audio_path"] = ["data/a2.wav", "data/nope.wav"]
    rows.append(dict(rows[0]))
    (root / "test.json").write_text(json.dumps(rows, indent=2))
    lines = (root / "test.json").read_text().splitlines()
    starts = [i for i, line in enumerate(lines, 1) if line == "  {"]
    with pytest.raises(DatasetError) as e:
        registry.load_benchmark("mmau-pro", str(root / "test.json"))
    message = str(e.value)
    assert f"test.json:{starts[1]}: audio file not found: {root / 'data' / 'nope.wav'}" in message
    assert f"test.json:{starts[2]}: id 'q1' already used at {root / 'test.json'}:{starts[0]}" in message


def test_mmau_pro_parquet_rows_file_in_the_hugging_face_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    root = tmp_path / "MMAU-Pro"
    rows = [{k: r.get(k) for k in ("id", "audio_path", "question", "choices", "answer", "category")}
            for r in mmau_rows(root)]
    pq.write_table(pa.Table.from_pylist(rows), str(root / "test.parquet"))
    ds = registry.load_benchmark("mmau-pro", str(root))
    assert [s.id for s in ds.samples] == ["q1", "q2"]
    assert audio_parts(ds.samples[0]) == [str(root / "data" / "a1.wav")]


def test_mmau_pro_parquet_without_pyarrow_says_how_to_convert(tmp_path, monkeypatch):
    (tmp_path / "test.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetError, match=r"test.parquet: reading parquet needs pyarrow.*download_datasets.sh"):
        registry.load_benchmark("mmau-pro", str(tmp_path))


def test_mmau_pro_directory_with_several_rows_files_asks_for_one(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [])
    write_jsonl(tmp_path / "b.jsonl", [])
    with pytest.raises(DatasetError, match=r"several rows files \(a.jsonl, b.jsonl\)"):
        registry.load_benchmark("mmau-pro", str(tmp_path))


def test_mmau_pro_unknown_task_is_refused_naming_the_known_ones(tmp_path):
    root = tmp_path / "mmau-pro"
    write_jsonl(root / "test.jsonl", mmau_rows(root))
    with pytest.raises(DatasetError, match=r"options.task: expected one of mc, open, instruction, got 'closed_form'"):
        registry.load_benchmark("mmau-pro", str(root), {"task": "closed_form"})


# --- text-mc ------------------------------------------------------------------------------------------------

def test_text_mc_mmlu_columns_with_letter_answers(tmp_path):
    path = tmp_path / "mmlu.csv"
    path.write_text('question,A,B,C,D,answer\n'
                    '"Find 2+2, please.",3,4,5,6,B\n'
                    'Which is a prime?,4,6,7,9,(C)\n', encoding="utf-8")
    ds = registry.load_benchmark("text-mc", str(path))
    first = ds.samples[0]
    assert first.messages == [{"role": "user", "content": "Find 2+2, please.\n(A) 3\n(B) 4\n(C) 5\n(D) 6\nAnswer:"}]
    assert (first.target, first.choices, first.metadata["letter"]) == ("4", ["3", "4", "5", "6"], "B")
    assert (ds.samples[1].target, ds.samples[1].metadata["letter"]) == ("7", "C")
    assert ds.metadata["source_format"] == "mmlu" and [s.id for s in ds.samples] == ["mmlu-0", "mmlu-1"]
    assert_canonical(ds, tmp_path)


def test_text_mc_kmmlu_one_based_index_answers_and_category(tmp_path):
    path = tmp_path / "Accounting-test.csv"
    path.write_text("question,answer,A,B,C,D,Category,Human Accuracy\n"
                    "부가가치세 세율은?,2,5%,10%,15%,20%,Accounting,0.5\n"
                    "감가상각 방법이 아닌 것은?,4,정액법,정률법,연수합계법,선입선출법,Accounting,0.4\n",
                    encoding="utf-8")
    ds = registry.load_benchmark("text-mc", str(path))
    assert [(s.target, s.metadata["letter"], s.category) for s in ds.samples] == [
        ("10%", "B", "Accounting"), ("선입선출법", "D", "Accounting")]
    assert ds.metadata["source_format"] == "kmmlu"


def test_text_mc_out_of_range_and_missing_answers_are_all_reported_with_lines(tmp_path):
    path = tmp_path / "kmmlu.csv"
    path.write_text("question,answer,A,B,C,D\nq1,5,a,b,c,d\nq2,0,a,b,c,d\nq3,,a,b,c,d\nq4,1,a,,c,d\n")
    with pytest.raises(DatasetError) as e:
        registry.load_benchmark("text-mc", str(path))
    message = str(e.value)
    assert "4 problem(s)" in message
    assert f"{path}:2: answer 5 (1-based index) is out of range for 4 choices" in message
    assert f"{path}:3: answer 0 (1-based index) is out of range for 4 choices" in message
    assert f"{path}:4: no answer" in message
    assert f"{path}:5: choice B is empty" in message


def test_text_mc_jsonl_choices_list_takes_index_letter_or_text(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": "x", "question": "q?", "choices": ["1", "2", "3"], "answer": 0, "subject": "math"},
        {"question": "q?", "choices": ["1", "2", "3"], "answer": "C"},
        {"question": "q?", "choices": ["1", "2", "3"], "answer": "2"},  # the choice text "2", not an index
    ])
    ds = registry.load_benchmark("text-mc", str(path))
    assert [(s.id, s.target, s.metadata["letter"]) for s in ds.samples] == [
        ("x", "1", "A"), ("mc-1", "3", "C"), ("mc-2", "2", "B")]
    assert ds.samples[0].category == "math" and ds.metadata["source_format"] == "choices-list"
    with pytest.raises(DatasetError, match=r"mc.jsonl:1: answer 0 \(1-based index\) is out of range"):
        registry.load_benchmark("text-mc", str(path), {"answer_index_base": 1})


def test_text_mc_folder_of_headerless_mmlu_csvs_uses_file_names_as_categories(tmp_path):
    test_dir = tmp_path / "data" / "test"
    test_dir.mkdir(parents=True)
    (test_dir / "abstract_algebra_test.csv").write_text('"Find the degree, for Q(sqrt(2))",0,4,2,6,C\n')
    (test_dir / "anatomy_test.csv").write_text("Which bone?,Femur,Tibia,Ulna,Skull,A\n"
                                               "Which organ?,Heart,Lung,Liver,Skin,D\n")
    ds = registry.load_benchmark("text-mc", str(test_dir))
    assert [(s.id, s.category, s.target) for s in ds.samples] == [
        ("abstract_algebra_test-0", "abstract_algebra_test", "2"), ("anatomy_test-0", "anatomy_test", "Femur"),
        ("anatomy_test-1", "anatomy_test", "Skin")]
    assert len(registry.load_benchmark("text-mc", str(test_dir), sample_size=2).samples) == 2
    assert text_part(ds.samples[0]).startswith("Find the degree, for Q(sqrt(2))\n(A) 0\n")


def test_text_mc_row_without_choices_names_the_expected_columns(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q?", "answer": "A"}])
    expected = r"mc.jsonl:1: no choices: expected a 'choices' list or A, B, C, D columns"
    with pytest.raises(DatasetError, match=expected):
        registry.load_benchmark("text-mc", str(path))


# --- text-qa ------------------------------------------------------------------------------------------------

def test_text_qa_configurable_columns_template_and_answer_lists(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"qid": "a", "q": "Capital of France?", "ctx": "France is in Europe.", "gold": ["Paris", "paris, France"]},
        {"qid": "b", "q": "2+3?", "ctx": "", "gold": 5},
    ])
    ds = registry.load_benchmark("text-qa", str(path), {
        "question_column": "q", "answer_column": "gold", "id_column": "qid",
        "prompt": "{ctx}\nQuestion: {question}\nAnswer:"})
    a, b = ds.samples
    assert (a.id, a.target, a.references) == ("a", "Paris", ["Paris", "paris, France"])
    assert text_part(a) == "France is in Europe.\nQuestion: Capital of France?\nAnswer:"
    assert (b.target, b.references) == ("5", None)
    assert registry.default_metrics("text-qa", ds) == ["exact_match", "token_f1"]
    assert_canonical(ds, tmp_path)


def test_text_qa_missing_answer_and_unknown_template_field_are_reported(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWho?,Me\nWhat?,\n")
    with pytest.raises(DatasetError, match=r"qa.csv:3: no answer \(column 'answer'"):
        registry.load_benchmark("text-qa", str(path))
    path.write_text("question,answer\nWho?,Me\n")
    with pytest.raises(DatasetError, match=r"options.prompt: no field 'context'"):
        registry.load_benchmark("text-qa", str(path), {"prompt": "{context} {question}"})


def test_text_mc_header_with_a_renamed_question_column_is_not_data(tmp_path):
    src = tmp_path / "mc.csv"
    src.write_text("instruction,answer,A,B,C,D\nPick the colour of the sky,B,red,blue,green,black\n")
    ds = registry.load_benchmark("text-mc", str(src), {"question_column": "instruction"})
    assert len(ds.samples) == 1 and ds.samples[0].target == "blue"
