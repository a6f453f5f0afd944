"""Recipes for public datasets: each fixture (tests/fixtures/, rows written by us in the dataset's
published schema) renders exactly like the conversation built by hand with openai-harmony, bad rows
are named, and every recipe trains a few steps with `gptoss-ft train` on its fixture."""

import json

import pytest

pytest.importorskip("openai_harmony")
from harmony_oracle import (ENC, assert_pair, assert_renders_like, assistant, call, developer,  # noqa: E402
                            oracle_prompt, system, user)
from openai_harmony import ReasoningEffort  # noqa: E402

from data import DataError, load_examples, load_pairs, load_prompts  # noqa: E402
from data.mappings import MAPPINGS  # noqa: E402

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def fixture_rows(name):
    path = FIXTURES / name
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- Multilingual-Thinking: reasoning language in the developer instructions ---

def test_multilingual_thinking_renders_like_the_cookbook_conversation():
    rows = fixture_rows("multilingual_thinking.jsonl")
    for row in rows:
        instructions = f"reasoning language: {row['reasoning_language']}"
        if row["developer"]:
            instructions += "\n\n" + row["developer"]
        want = [developer(instructions), user(row["user"]), assistant(row["analysis"], "analysis"),
                assistant(row["final"], "final")]
        got = assert_renders_like(row, "multilingual_thinking", want)
        # the dataset's own messages column, read as plain messages, is the same conversation
        same, _ = load_examples([{"messages": row["messages"]}], "messages")
        assert [(e.input_ids, e.loss_mask) for e in same] == [(e.input_ids, e.loss_mask) for e in got]
    text = ENC.decode_utf8(load_examples(FIXTURES / "multilingual_thinking.jsonl", "multilingual_thinking")[0][0].input_ids)
    assert "# Instructions\n\nreasoning language: French\n\nYou are an AI chatbot" in text


# --- xlam: tools as Harmony function declarations, answers as commentary calls ---

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "description": "City name, e.g. Paris.", "default": "Paris"},
    "units": {"type": "string", "description": "celsius or fahrenheit."}}}
STOCK = {"type": "object", "properties": {"symbol": {"type": "string", "description": "Ticker symbol."}},
         "required": ["symbol"]}
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "description": "Free-text search."},
    "categories": {"type": "array", "items": {"type": "integer"}, "description": "Category ids to restrict to."},
    "price_range": {"type": "array", "items": {"type": "number"}, "description": "Min and max price."},
    "filters": {"type": "object", "description": 'Attribute filters, e.g. {"color": "red"}.', "default": {}},
    "in_stock": {"type": "boolean", "description": "Only products in stock.", "default": True},
    "limit": {"type": "integer", "description": "Maximum results.", "default": 10},
    "on_result": {"description": "Callback for each result."}}, "required": ["query", "categories"]}
NOW = None  # no parameters: declared `() => any`


def test_xlam_tools_and_calls_render_like_openai_harmony():
    rows = fixture_rows("xlam_function_calling_60k.json")
    weather = ("get_weather", "Current weather for a city.", WEATHER)
    stock = ("stock_quote", "Latest quote of a ticker.", STOCK)
    search = ("search_products", json.loads(rows[2]["tools"])[0]["description"], SEARCH)
    now = ("current_time", "The current UTC time.", NOW)
    cases = [
        [developer(None, [weather, stock]), user(rows[0]["query"]),
         call("get_weather", '{"city":"Tokyo","units":"celsius"}')],
        # two calls in one answer: one message each, back to back, both trained
        [developer(None, [stock]), user(rows[1]["query"]), call("stock_quote", '{"symbol":"AAPL"}'),
         call("stock_quote", '{"symbol":"ZURN.SW"}')],
        [developer(None, [search, now]), user(rows[2]["query"]), call("search_products", json.dumps(
            {"query": "running shoes", "categories": [12], "price_range": [0, 80], "filters": {"color": "red"},
             "limit": 5}, separators=(",", ":")))],
        [developer(None, [now, weather]), user(rows[3]["query"]), call("current_time", "{}")],
    ]
    for row, want in zip(rows, cases):
        got = assert_renders_like(row, "xlam", want)
        assert all(any(e.loss_mask) for e in got)
    examples, _ = load_examples(rows[1:2], "xlam")
    text = ENC.decode_utf8(examples[-1].input_ids)
    assert text.count("<|call|>") == 2 and "to=functions.stock_quote" in text
    # the declarations are the TypeScript-like ones: optional marks, arrays, defaults, a no-argument tool
    text = ENC.decode_utf8(load_examples(rows[2:3], "xlam")[0][0].input_ids)
    for piece in ("categories: number[],", "price_range?: number[],", "in_stock?: boolean, // default: true",
                  "on_result?: any,", "type current_time = () => any;"):
        assert piece in text, piece


def test_xlam_empty_answers_are_an_error_or_skipped_and_counted():
    path = FIXTURES / "xlam_function_calling_60k.json"
    with pytest.raises(DataError, match=r"xlam_function_calling_60k.json item 4: 'answers' is empty") as e:
        load_examples(path, "xlam")
    assert e.value.reason == "no tool call"
    examples, report = load_examples(path, "xlam", on_error="skip")
    assert report.skipped == {"no tool call": 1} and {e.row for e in examples} == {0, 1, 2, 3}


# --- OpenR1-Math: the first verified, complete generation; reasoning in analysis, high effort ---

def test_openr1_math_trains_the_first_verified_complete_generation():
    path = FIXTURES / "openr1_math.jsonl"
    rows = fixture_rows("openr1_math.jsonl")
    want = {
        0: ("Subtract 3: $2x = 8$, so $x = 4$. Check: $2\\cdot 4 + 3 = 11$.", "The solution is $\\boxed{4}$."),
        1: ("Gauss: $n(n+1)/2 = 10 \\cdot 11 / 2 = 55$.", "The sum is $\\boxed{55}$."),  # the first is wrong
        # the first is verified but cut off (reasoning incomplete, finish "length"); the second has the judge's verdict
        2: ("The square root of 144 is 12; minus 3 gives 9.", "**9**"),
    }
    for i, (thinking, answer) in want.items():
        assert_renders_like(rows[i], "openr1_math", [system(ReasoningEffort.HIGH), user(rows[i]["problem"]),
                                                     assistant(thinking, "analysis"), assistant(answer, "final")])
    with pytest.raises(DataError, match=r"openr1_math.jsonl:4: none of the 2 generations is verified and complete"):
        load_examples(path, "openr1_math")
    _, report = load_examples(path, "openr1_math", on_error="skip")
    assert report.skipped == {"no verified generation": 1} and report.examples == 3


# --- UltraFeedback (DPO): the generic preference format reads its rows as they are ---

def test_ultrafeedback_binarized_pairs_match_openai_harmony():
    for name in ("ultrafeedback_binarized_train_prefs.jsonl", "ultrafeedback_binarized_test_prefs.jsonl"):
        pairs, report = load_pairs(FIXTURES / name)
        rows = fixture_rows(name)
        assert report.examples == len(rows) and not report.skipped
        for pair, row in zip(pairs, rows):
            assert_pair(pair, [user(row["prompt"])], [assistant(row["chosen"][-1]["content"], "final")],
                        [assistant(row["rejected"][-1]["content"], "final")])


# --- gsm8k (GRPO): question -> prompt, the number after #### -> the answer column ---

def test_gsm8k_prompts_and_reference_answers():
    prompts, report = load_prompts(FIXTURES / "gsm8k_train.jsonl", "gsm8k")
    rows = fixture_rows("gsm8k_train.jsonl")
    assert report.format == "gsm8k" and report.examples == len(rows)
    for p, row in zip(prompts, rows):
        assert p.prompt == oracle_prompt([user(row["question"])])
        assert p.columns["solution"] == row["answer"].rpartition("####")[0].strip()
    assert [p.columns["answer"] for p in prompts] == ["72", "10", "1550", "3"]
    # low effort, as the recipe asks
    low, _ = load_prompts(FIXTURES / "gsm8k_train.jsonl", "gsm8k", reasoning_effort="low")
    assert low[0].prompt == oracle_prompt([system(ReasoningEffort.LOW), user(rows[0]["question"])])


# --- bad rows in each schema: file, row and reason ---

BAD = [
    ("multilingual_thinking", {"reasoning_language": "French", "developer": "", "user": "hi", "analysis": "a"},
     "missing final", "no 'final' column"),
    ("multilingual_thinking", {"reasoning_language": "", "developer": "", "user": "hi", "analysis": "a", "final": "b"},
     "empty reasoning_language", "'reasoning_language' is empty"),
    ("xlam", {"id": 1, "query": "q", "answers": "[{\"name\": \"f\"", "tools": "[]"}, "invalid JSON",
     "'answers' is not valid JSON"),
    ("xlam", {"id": 1, "query": "q", "answers": '[{"name": "g", "arguments": {}}]',
              "tools": '[{"name": "f", "description": "", "parameters": {}}]'}, "unknown tool",
     "answers[0] calls 'g', which is not among the row's tools (f)"),
    ("xlam", {"id": 1, "query": "q", "answers": "[]", "tools": '[{"description": "x"}]'}, "bad tools",
     "tools[0]: a tool needs a name"),
    ("openr1_math", {"problem": "p", "generations": "<think>x</think>y"}, "bad generations",
     "'generations' must be list, got str"),
    ("openr1_math", {"problem": "p", "generations": ["no think tags"], "correctness_math_verify": [True]},
     "bad generation", "generations[0] is verified but has no </think>"),
    ("gsm8k", {"question": "q", "answer": "42"}, "no reference answer", "does not end with '#### N'"),
    ("gsm8k", {"answer": "#### 1"}, "missing question", "no 'question' column"),
]


@pytest.mark.parametrize("fmt, row, reason, message", BAD)
def test_bad_rows_name_file_line_and_reason(tmp_path, fmt, row, reason, message):
    path = tmp_path / "rows.jsonl"
    good = fixture_rows({"multilingual_thinking": "multilingual_thinking.jsonl", "xlam": "xlam_function_calling_60k.json",
                         "openr1_math": "openr1_math.jsonl", "gsm8k": "gsm8k_train.jsonl"}[fmt])[0]
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    load = load_prompts if MAPPINGS[fmt].kind == "prompts" else load_examples
    with pytest.raises(DataError) as e:
        load(path, fmt)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)
    assert e.value.reason == reason
    _, report = load(path, fmt, on_error="skip")
    assert report.skipped == {reason: 1} and report.examples >= 1


def test_ultrafeedback_bad_row_is_named(tmp_path):
    row = fixture_rows("ultrafeedback_binarized_train_prefs.jsonl")[0]
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "rejected": []}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:2: rejected is empty"):
        load_pairs(path)


def test_mapping_kind_must_suit_the_loader():
    with pytest.raises(DataError, match="format 'gsm8k' is not for supervised fine-tuning"):
        load_examples(FIXTURES / "gsm8k_train.jsonl", "gsm8k")
    with pytest.raises(DataError, match="format must be one of auto, prompts, gsm8k, got 'xlam'"):
        load_prompts(FIXTURES / "gsm8k_train.jsonl", "xlam")


# --- every recipe trains on its fixture: `gptoss-ft train recipes/NAME.yaml` with the hub id overridden ---

RECIPE_DATA = {
    "multilingual-thinking": ["data.train=tests/fixtures/multilingual_thinking.jsonl"],
    "xlam-function-calling": ["data.train=tests/fixtures/xlam_function_calling_60k.json"],
    "openr1-math": ["data.train=tests/fixtures/openr1_math.jsonl"],
    "ultrafeedback-dpo": ["data.train=tests/fixtures/ultrafeedback_binarized_train_prefs.jsonl", "data.split=train",
                          "data.eval=tests/fixtures/ultrafeedback_binarized_test_prefs.jsonl", "data.eval_split=train"],
    "gsm8k-grpo": ["data.train=tests/fixtures/gsm8k_train.jsonl", "data.subset=null", "grpo.num_generations=2",
                   "grpo.max_new_tokens=8"],
}


def test_every_recipe_has_a_fixture_run():
    import recipes

    assert sorted(RECIPE_DATA) == sorted(p.stem for p in recipes.paths() if not p.stem.startswith("quickstart"))


def small_run(tiny_hf, out, *extra):
    """Overrides that put a recipe on the tiny test model for two steps (what a CPU smoke run is)."""
    return [f"model.path={tiny_hf}", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
            "train.eval_every=2", "train.log_every=1", "data.max_seq_len=512", "lora.r=4", f"output_dir={out}", *extra]


@pytest.mark.parametrize("name", sorted(RECIPE_DATA))
def test_recipe_trains_on_its_fixture(name, tiny_hf, tmp_path, monkeypatch, capsys):
    from finetune.cli import main
    from finetune.run import RunDir

    monkeypatch.chdir(ROOT)  # the overrides' relative paths are the user's, from the repository root
    assert main(["train", f"recipes/{name}.yaml", *small_run(tiny_hf, tmp_path / "run"), *RECIPE_DATA[name]]) == 0
    run = RunDir(tmp_path / "run")
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert any(k.startswith("eval_") for r in rows for k in r), rows
    cfg = run.config  # what ran: the recipe over its hardware file, with the overrides
    assert cfg.model.path == str(tiny_hf) and cfg.model.gradient_checkpointing
    assert cfg.data.format == {"ultrafeedback-dpo": "preference"}.get(name, cfg.data.format) != "auto"
    out = capsys.readouterr()
    if name == "xlam-function-calling":
        assert "skipped" in out.out + out.err and "no tool call" in out.out + out.err  # counted, not silent


# --- a hub dataset in the local datasets cache, read offline through the recipe's own hub id ---

def save_in_hub_cache(cache, repo, config, splits):
    """Write `splits` ({split: rows}) where `datasets` keeps a downloaded hub dataset: Arrow files and
    dataset_info.json under CACHE/NAMESPACE___NAME/CONFIG/VERSION/HASH/, which load_dataset(repo,
    config) reads with HF_DATASETS_OFFLINE=1."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase

    namespace, name = repo.split("/")
    name = camelcase_to_snakecase(name)
    folder = cache / f"{namespace}___{name}" / config / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    infos, features = datasets.SplitDict(), None
    for split, rows in splits.items():
        ds = datasets.Dataset.from_list(rows)
        features = ds.features
        with ArrowWriter(path=str(folder / f"{name}-{split}.arrow"), features=features) as w:
            w.write_table(ds.data.table)
            n, size = w.finalize()
        infos.add(datasets.SplitInfo(split, num_bytes=size, num_examples=n, dataset_name=name))
    datasets.DatasetInfo(features=features, config_name=config, dataset_name=name, splits=infos).write_to_directory(str(folder))


def test_recipes_read_hub_datasets_from_the_offline_cache(tiny_hf, tmp_path):
    import os
    import subprocess
    import sys

    cache = tmp_path / "hf-datasets"
    save_in_hub_cache(cache, "openai/gsm8k", "main", {"train": fixture_rows("gsm8k_train.jsonl"),
                                                      "test": fixture_rows("gsm8k_test.jsonl")})
    save_in_hub_cache(cache, "HuggingFaceH4/ultrafeedback_binarized", "default", {
        "train_prefs": fixture_rows("ultrafeedback_binarized_train_prefs.jsonl"),
        "test_prefs": fixture_rows("ultrafeedback_binarized_test_prefs.jsonl")})
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "finetune.cli"]
    # the recipe exactly as shipped (data.train: openai/gsm8k, subset main), on the tiny model
    done = subprocess.run([*cli, "train", "recipes/gsm8k-grpo.yaml", *small_run(tiny_hf, tmp_path / "run"),
                           "grpo.num_generations=2", "grpo.max_new_tokens=8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "openai/gsm8k[main/train]: format gsm8k, 4 rows -> 4 prompts" in done.stdout + done.stderr
    # DPO's splits by name, as the recipe reads them
    done = subprocess.run([*cli, "render", "HuggingFaceH4/ultrafeedback_binarized", "--split", "test_prefs",
                           "--format", "preference", "--jsonl"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(pairs) == 2 and "100 °C." in ENC.decode_utf8(pairs[0]["chosen"]["input_ids"])
    # without the cache, the error says how to work offline
    done = subprocess.run([*cli, "render", "openai/gsm8k", "--subset", "main", "--format", "gsm8k"], cwd=ROOT,
                          env={**env, "HF_DATASETS_CACHE": str(tmp_path / "empty")}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "HF_DATASETS_OFFLINE=1" in done.stderr


def test_readme_shows_the_table_gptoss_ft_recipes_prints(capsys):
    from finetune.cli import main

    assert main(["recipes", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    import recipes

    assert table.count("\n| `") == len(recipes.paths())  # one row per recipe file
    assert table in (ROOT / "README.md").read_text(), "README's Recipes table is stale: paste `gptoss-ft recipes --markdown`"
    assert main(["recipes", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["name"]: r for r in listed}
    assert by_name["gsm8k-grpo"]["method"] == "grpo (lora)" and by_name["gsm8k-grpo"]["dataset"] == "openai/gsm8k (main)"
    for r in listed:  # a 120b plan needs more than the 20b one of the same recipe
        if r["name"].startswith("quickstart"):
            assert r["planned_gib"] is None and r["hardware"] == "../configs/tiny-cpu.yaml"
            assert r["dataset"].startswith("recipes/data/quickstart_")  # shown relative to the repository
        else:
            assert 0 < r["planned_gib"]["openai/gpt-oss-20b"] < r["planned_gib"]["openai/gpt-oss-120b"]


def test_hardware_files_merge_under_the_recipe(tmp_path):
    from finetune import config as cfglib

    recipe = ROOT / "recipes" / "gsm8k-grpo.yaml"
    cfg = cfglib.load(recipe, check_paths=False)
    assert cfg.model.path == "openai/gpt-oss-20b" and cfg.model.offload_experts == "auto"  # from the hardware file
    assert cfg.train.grad_accum == 4 and cfg.train.batch_size == 1  # the recipe's own value wins; the file's
    big = cfglib.load(recipe, [f"hardware={ROOT / 'configs' / 'gpt-oss-120b.yaml'}", "train.grad_accum=2"],
                      check_paths=False)
    assert big.model.path == "openai/gpt-oss-120b" and big.train.grad_accum == 2  # command line wins over both
    # the hardware file's relative paths are its own; a hardware file naming another, or a missing one, is named
    (tmp_path / "hw").mkdir()
    (tmp_path / "hw" / "local.yaml").write_text("model: {path: ckpt, experts: mxfp4}\n")
    (tmp_path / "hw" / "ckpt").mkdir()
    (tmp_path / "r.yaml").write_text("hardware: hw/local.yaml\ndata: {train: d.jsonl}\noutput_dir: out\n")
    (tmp_path / "d.jsonl").write_text("{}\n")
    assert cfglib.load(tmp_path / "r.yaml").model.path == str(tmp_path / "hw" / "ckpt")
    (tmp_path / "hw" / "loop.yaml").write_text("hardware: local.yaml\n")
    with pytest.raises(cfglib.ConfigError, match="names no other hardware file"):
        cfglib.load(tmp_path / "r.yaml", [f"hardware={tmp_path / 'hw' / 'loop.yaml'}"])
    with pytest.raises(cfglib.ConfigError, match="no such hardware file"):
        cfglib.load(tmp_path / "r.yaml", ["hardware=configs/nope.yaml"])


def test_render_shows_what_a_mapped_row_becomes(capsys):
    from finetune.cli import main

    assert main(["render", str(FIXTURES / "xlam_function_calling_60k.json"), "--format", "xlam", "--jsonl"]) == 2
    assert "item 4: 'answers' is empty" in capsys.readouterr().err  # the usual named error
    assert main(["render", str(FIXTURES / "xlam_function_calling_60k.json"), "--format", "xlam", "--on-error", "skip",
                 "--jsonl"]) == 0
    out = capsys.readouterr()
    examples = [json.loads(line) for line in out.out.splitlines()]
    assert examples == [{"input_ids": e.input_ids, "loss_mask": e.loss_mask}
                        for e in load_examples(FIXTURES / "xlam_function_calling_60k.json", "xlam", on_error="skip")[0]]
    assert main(["render", str(FIXTURES / "gsm8k_train.jsonl"), "--format", "gsm8k", "--limit", "1"]) == 0
    shown = capsys.readouterr().out
    assert "Natalia sold clips" in shown and "72" in shown  # the prompt, and the answer column for the reward
