"""The recap loop end to end: accounting, planted bad captions, provenance, hints, kill-and-rerun, ranks, and
training-side reading of the output."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from evev2.data.errors import TooManyBadSamplesError
from evev2.recap.cli import run_recap
from evev2.recap.engine import RecapSettings
from evev2.recap.filters import FilterConfig
from evev2.recap.prompts import HINT_PREAMBLE, PROMPT_SETS

KEYS = [f"{i:06d}" for i in range(12)]  # the world_shards fixture: 12 scenes in three shards of four


def _shards(world: Path) -> list[str]:
    return [str(world / "shards" / "train-*.tar")]


def _decisions(out: Path) -> dict[str, dict]:
    """key -> decision over every finished unit (asserting no key is decided twice)."""
    decided: dict[str, dict] = {}
    for path in sorted(out.glob("*.recap.json")):
        for sample in json.loads(path.read_text())["samples"]:
            assert sample["key"] not in decided, f"{sample['key']} decided twice"
            decided[sample["key"]] = sample
    return decided


def _tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> members over every output tar (asserting no key is written twice)."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*.tar")):
        for sample in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()):
            assert sample["__key__"] not in samples, f"{sample['__key__']} written twice"
            samples[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


def test_planted_captions_are_dropped_and_the_rest_kept_with_provenance(tmp_path, world_shards,
                                                                          scripted_captioner, capsys):
    planted = {1: ("the dog the dog the dog the dog the dog the dog", "length"),
               3: ("ok", "stop"),
               5: ("Ein kleines rotes Auto steht am linken Rand einer ruhigen Straße", "stop"),
               7: ("a tiny picture of something that goes on and on and", "length")}
    captioner = scripted_captioner(planted)
    settings = RecapSettings("models/captioner-x", prompt_set="synth", hints="synth-truth", batch_size=3,
                             max_new_tokens=64)
    stats = run_recap(captioner, _shards(world_shards), tmp_path, settings)
    decided = _decisions(tmp_path)
    assert sorted(decided) == KEYS  # every image got a decision
    reasons = {key: d["reason"] for key, d in decided.items()}
    assert [reasons[k] for k in ("000001", "000003", "000005", "000007")] == [
        "repetitive", "too_short", "not_english", "truncated"]
    kept = [k for k, r in reasons.items() if r is None]
    assert len(kept) == 8 and stats["total"] == {
        "samples": 12, "kept": 8, "dropped": 4, "shard_errors": 0,
        "dropped_by_reason": {"not_english": 1, "repetitive": 1, "too_short": 1, "truncated": 1}}
    assert sum(s["samples"] for s in stats["shards"].values()) == 12 and stats["shards_finished"] == 3
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert "recap: 12 samples in 3/3 shards: kept 8" in capsys.readouterr().out

    records = json.loads((world_shards / "train.json").read_text())
    written = _tar_samples(tmp_path)
    assert sorted(written) == sorted(kept)  # dropped samples are left out of the shards
    for key in kept:
        members, original = written[key], records[int(key)]
        record = json.loads(members["json"])
        caption = decided[key]["caption"]
        assert members["png"] == (world_shards / original["image"]).read_bytes()
        assert members["txt"].decode() == record["caption"] == caption
        assert record["conversations"] == [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
        assert record["original_caption"] == original["caption"] == decided[key]["original_caption"]
        assert record["original_conversations"] == original["conversations"]
        assert record["objects"] == original["objects"]
        provenance = record["recap"]
        assert provenance["captioner"] == "models/captioner-x" and provenance["captioner_name"] == "captioner-x"
        assert provenance["prompt_set"] == "synth" and provenance["hint_source"] == "synth-truth"
        assert provenance["generation"] == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "batch_size": 3}
        assert provenance["hint"].startswith("Objects: ") and original["objects"][0]["shape"] in provenance["hint"]
        assert provenance["prompt"] == f"{HINT_PREAMBLE}\n{provenance['hint']}\n\n{PROMPT_SETS['synth']}"
        assert provenance["created"].endswith("+00:00") and provenance["finish_reason"] == "stop"
    # the hint text reached every request the captioner saw
    prompts = [r.messages[0]["content"][-1]["text"] for r in captioner.requests]
    assert len(prompts) == 12 and all(p.startswith(HINT_PREAMBLE + "\nObjects: ") for p in prompts)


def test_duplicates_bad_inputs_and_near_duplicate_images(tmp_path, world_shards, scripted_captioner):
    png = [(world_shards / "images" / "train" / f"{k}.png").read_bytes() for k in KEYS[:3]]
    with wds.TarWriter(str(tmp_path / "web.tar")) as writer:
        writer.write({"__key__": "a", "png": png[0], "txt": b"web alt text a"})
        writer.write({"__key__": "b", "png": png[1], "txt": b"web alt text b"})
        writer.write({"__key__": "a-copy", "png": png[0], "txt": b"same image again"})
        writer.write({"__key__": "broken", "png": b"\x89PNG not really", "txt": b"x"})
        writer.write({"__key__": "c", "png": png[2], "txt": b"web alt text c"})
    same = ("there is a picture of a shape on a plain background here .", "stop")
    captioner = scripted_captioner({1: same, 2: same})  # requests: a, b, c (a-copy and broken never reach it)
    settings = RecapSettings("cap", filters=FilterConfig(image_dedup_distance=2))
    stats = run_recap(captioner, [str(tmp_path / "web.tar")], tmp_path / "out", settings)
    reasons = {k: d["reason"] for k, d in _decisions(tmp_path / "out").items()}
    assert reasons == {"a": None, "b": None, "a-copy": "near_duplicate_image", "broken": "bad_image",
                       "c": "duplicate_caption"}
    assert len(captioner.requests) == 3 and stats["total"]["kept"] == 2
    assert json.loads(_tar_samples(tmp_path / "out")["a"]["json"])["original_caption"] == "web alt text a"


def test_too_many_unusable_inputs_fail_the_run(tmp_path, scripted_captioner):
    (tmp_path / "broken.json").write_text(json.dumps([{"image": f"missing{i}.png"} for i in range(210)]))
    with pytest.raises(TooManyBadSamplesError, match="missing_image"):
        run_recap(scripted_captioner(), [str(tmp_path / "broken.json")], tmp_path / "out", RecapSettings("cap"))


class _Killed(RuntimeError):
    pass


def test_killed_and_rerun_gives_exactly_one_output_per_input(tmp_path, world_shards, scripted_captioner):
    settings = RecapSettings("cap", hints="synth-truth", batch_size=4)  # one generate call per shard of four
    clean = tmp_path / "clean"
    run_recap(scripted_captioner(), _shards(world_shards), clean, settings)

    out = tmp_path / "resumed"
    inner = scripted_captioner()

    def dies_on_second_shard(requests):
        if inner.requests:  # the first shard's batch was answered: "kill" the job in the second
            raise _Killed("simulated kill")
        return inner(requests)

    with pytest.raises(_Killed):
        run_recap(dies_on_second_shard, _shards(world_shards), out, settings)
    assert (out / "train-000000.tar").exists() and (out / "train-000001.tar.tmp").exists()
    assert not (out / "train-000001.tar").exists() and not (out / "stats.json").exists()
    (out / "train-000002.tar.tmp").write_bytes(b"half-written garbage from the kill")

    rerun = scripted_captioner()
    stats = run_recap(rerun, _shards(world_shards), out, settings)
    assert len(rerun.requests) == 8  # the finished shard was skipped, the other two redone
    assert not list(out.glob("*.tmp"))
    assert sorted(_decisions(out)) == KEYS and stats["total"]["samples"] == 12
    assert _decisions(out) == _decisions(clean)  # the same result as an uninterrupted job
    assert {k: v["txt"] for k, v in _tar_samples(out).items()} == {k: v["txt"] for k, v in _tar_samples(clean).items()}


def test_ranks_split_the_shards_and_rank0_reports_all(tmp_path, world_shards, scripted_captioner):
    settings = RecapSettings("cap")
    barrier_calls = []
    # run rank 1 first: rank 0 then reports after its barrier, over both ranks' shards
    assert run_recap(scripted_captioner(), _shards(world_shards), tmp_path, settings, rank=1, world_size=2,
                     barrier=lambda: barrier_calls.append(1)) is None
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000001.tar"]
    stats = run_recap(scripted_captioner(), _shards(world_shards), tmp_path, settings, rank=0, world_size=2,
                      barrier=lambda: barrier_calls.append(0))
    assert barrier_calls == [1, 0]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    assert stats["shards_finished"] == 3 and stats["total"]["samples"] == 12 and sorted(_decisions(tmp_path)) == KEYS


def test_recap_output_feeds_a_weighted_training_mixture(tmp_path, world_shards, tiny_vlm_dir, scripted_captioner):
    """synthetic : language-only : recap = 1 : 1 : 1, as a recipe lists them; recap samples train on the new
    caption under the `plain` template (the input shards' multi-turn records could not: `plain` refuses them)."""
    from evev2.data.datasets import LlavaJsonSource, Mixture, WebDatasetSource
    from evev2.data.processor import EVEProcessor
    from evev2.data.samples import SampleBuilder
    from evev2.constants import IGNORE_INDEX

    run_recap(scripted_captioner(), _shards(world_shards), tmp_path / "recap", RecapSettings("cap"))
    new_captions = {d["caption"] for d in _decisions(tmp_path / "recap").values() if d["status"] == "kept"}
    (tmp_path / "text.json").write_text(json.dumps([{"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"say {i}"}, {"from": "gpt", "value": f"the number is {i} ."}]} for i in range(4)]))

    loaded = EVEProcessor.from_pretrained(tiny_vlm_dir)
    processor = EVEProcessor(loaded.tokenizer, loaded.image_processor, template="plain")
    builder = SampleBuilder(processor, max_tokens=1024)
    sources = [LlavaJsonSource("synthetic", world_shards / "train_captions.json", builder),
               LlavaJsonSource("language-only", tmp_path / "text.json", builder),
               WebDatasetSource("recap", sorted(map(str, (tmp_path / "recap").glob("*.tar"))), builder)]
    mixture = Mixture(sources, [1, 1, 1], seed=0)
    samples = [source.build(item) for source, item in (mixture.next_draw() for _ in range(30))]  # none is skipped
    assert {s.source for s in samples} == {"synthetic", "language-only", "recap"}
    assert not mixture.drain_read_skips()
    for sample in (s for s in samples if s.source == "recap"):
        supervised = processor.tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX])
        assert len(sample.images) == 1 and supervised.strip() in new_captions


def test_cli_on_the_tiny_model_accounts_for_every_image(tmp_path, tiny_vlm_dir, tiny_world_dir, capsys):
    """The real engine (random tiny captioner, so most captions are dropped): LLaVA JSON input, two output shards."""
    from evev2.cli import main

    out = tmp_path / "out"
    argv = ["recap", "--captioner", str(tiny_vlm_dir), "--input", str(tiny_world_dir / "train.json"), "--output",
            str(out), "--records-per-shard", "16", "--max-new-tokens", "4", "--prompt-set", "synth",
            "--batch-size", "16", "--image-dedup-distance", "0", "--device", "cpu"]
    stats = main(argv)
    decided = _decisions(out)
    assert sorted(decided) == [f"{i:08d}" for i in range(32)]
    total = stats["total"]
    assert total["samples"] == 32 and total["kept"] + total["dropped"] == 32
    assert sum(total["dropped_by_reason"].values()) == total["dropped"]
    assert sorted(_tar_samples(out)) == sorted(k for k, d in decided.items() if d["status"] == "kept")
    assert all(d["caption"] is not None for d in decided.values() if d["reason"] != "near_duplicate_image")
    printed = capsys.readouterr().out
    assert f"recap: 32 samples in 2/2 shards: kept {total['kept']}" in printed
    assert main(argv)["total"] == total  # a rerun finds every shard finished and reports the same
    with tarfile.open(next(out.glob("*.tar"))):
        pass  # a committed shard is a valid tar even when every sample was dropped


def test_the_hint_reaches_the_tokens_the_model_sees(tiny_chat_engine, world_shards):
    from PIL import Image

    from evev2.recap.engine import caption_request
    from evev2.recap.hints import synth_truth_hint
    from evev2.recap.prompts import build_prompt

    record = json.loads((world_shards / "train.json").read_text())[0]
    image = Image.open(world_shards / record["image"])
    hint = synth_truth_hint(image, record)
    request = caption_request(image, build_prompt(PROMPT_SETS["dense"], hint), RecapSettings("cap"))
    prompt = tiny_chat_engine.prepare(request)
    text = tiny_chat_engine.tokenizer.decode(prompt.input_ids[prompt.input_ids >= 0])
    assert hint in text and PROMPT_SETS["dense"] in text and len(prompt.images) == 1
