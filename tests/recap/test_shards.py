"""Input listing and reading (tar shards, LLaVA JSON, bad samples) and the atomic output writer."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds

from evev2.recap.shards import AtomicShardWriter, decisions_path, iter_items, list_input_shards


def test_globs_braces_and_llava_files_become_units(world_shards):
    shards_dir = world_shards / "shards"
    by_glob = list_input_shards([str(shards_dir / "*.tar")])
    by_brace = list_input_shards([str(shards_dir / "train-{000000..000002}.tar")])
    assert [s.name for s in by_glob] == [s.name for s in by_brace] == [f"train-00000{i}.tar" for i in range(3)]
    llava = list_input_shards([str(world_shards / "train.json")], records_per_shard=5)
    assert [(s.name, s.start, len(s.records)) for s in llava] == [
        ("train-000000.tar", 0, 5), ("train-000001.tar", 5, 5), ("train-000002.tar", 10, 2)]
    with pytest.raises(ValueError, match="same output shard"):
        list_input_shards([str(shards_dir / "*.tar"), str(world_shards / "train.json")], records_per_shard=5)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list_input_shards([str(shards_dir / "nope-*.tar")])
    with pytest.raises(ValueError, match="tar shards or a LLaVA"):
        list_input_shards([str(world_shards / "train_text.txt")])


def test_tar_and_llava_items_carry_image_record_and_original_caption(world_shards):
    records = json.loads((world_shards / "train.json").read_text())
    tar_items = [i for s in list_input_shards([str(world_shards / "shards" / "*.tar")]) for i in iter_items(s, [])]
    llava_items = [i for s in list_input_shards([str(world_shards / "train.json")], 5)
                   for i in iter_items(s, [])]
    assert len(tar_items) == len(llava_items) == len(records) == 12
    for record, tar_item, llava_item in zip(records, tar_items, llava_items):
        image = (world_shards / record["image"]).read_bytes()
        assert tar_item.problem is None and llava_item.problem is None
        assert tar_item.members["png"] == llava_item.members["png"] == image
        assert tar_item.record == llava_item.record == record
        assert tar_item.original_caption == llava_item.original_caption == record["caption"]


def test_bad_samples_become_problems_not_crashes(tmp_path, world_shards):
    png = (world_shards / "images" / "train" / "000000.png").read_bytes()
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as writer:
        writer.write({"__key__": "ok", "png": png, "txt": b"a caption from the web"})
        writer.write({"__key__": "badjson", "png": png, "json": b"{not json"})
        writer.write({"__key__": "noimage", "txt": b"just text"})
    items = {i.key: i for s in list_input_shards([str(tmp_path / "mixed.tar")]) for i in iter_items(s, [])}
    assert items["ok"].problem is None and items["ok"].original_caption == "a caption from the web"
    assert items["badjson"].problem[0] == "malformed_record"
    assert items["noimage"].problem[0] == "no_image"

    (tmp_path / "gif.gif").write_bytes(_gif_bytes())
    (tmp_path / "list.json").write_text(json.dumps([
        {"image": "missing.png", "caption": "x"}, "not a record", {"image": ["a.png", "b.png"]},
        {"conversations": [{"from": "gpt", "value": "text only"}]}, {"image": "gif.gif", "caption": "a gif"}]))
    llava = list(iter_items(list_input_shards([str(tmp_path / "list.json")])[0], []))
    assert [i.problem and i.problem[0] for i in llava] == [
        "missing_image", "malformed_record", "not_single_image", "no_image", None]
    assert llava[3].original_caption == "text only"
    assert llava[4].image_ext == "png" and llava[4].members["png"].startswith(b"\x89PNG")  # re-encoded


def _gif_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 128, 255)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_truncated_tar_is_counted_and_the_readable_part_kept(tmp_path, world_shards):
    shard = world_shards / "shards" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        image = next(m for m in tar.getmembers() if m.name.startswith("000002.") and m.name.endswith(".png"))
    (tmp_path / "cut.tar").write_bytes(shard.read_bytes()[: image.offset_data + image.size // 2])  # inside its image
    errors: list = []
    items = list(iter_items(list_input_shards([str(tmp_path / "cut.tar")])[0], errors))
    assert [(i.key, i.problem and i.problem[0]) for i in items] == [
        ("000000", None), ("000001", None), ("000002", "no_image")]
    assert len(errors) == 1 and errors[0]["reason"] == "bad_shard"


def test_atomic_writer_publishes_only_on_commit(tmp_path):
    (tmp_path / "a.tar.tmp").write_bytes(b"stale bytes of a killed run")
    writer = AtomicShardWriter(tmp_path, "a.tar")
    writer.write({"__key__": "k1", "txt": b"hello"})
    assert not (tmp_path / "a.tar").exists()
    writer.commit({"samples": []})
    assert not (tmp_path / "a.tar.tmp").exists() and not (tmp_path / "a.recap.json.tmp").exists()
    assert json.loads(decisions_path(tmp_path, "a.tar").read_text()) == {"samples": []}
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == ["k1.txt"] and tar.extractfile("k1.txt").read() == b"hello"

    aborted = AtomicShardWriter(tmp_path, "b.tar")
    aborted.write({"__key__": "k1", "txt": b"hello"})
    aborted.abort()
    assert (tmp_path / "b.tar.tmp").exists() and not (tmp_path / "b.tar").exists()
