"""voxblock evaluate: VOI and adapted Rand error from a contingency table summed slab by slab.

scikit-image's whole-image metrics are the reference: the table of any slabs, merged, must score
as skimage scores the whole volumes (ground truth first), with voxels of ground truth 0 ignored
or counted.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from funlib.geometry import Coordinate, Roi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage.metrics import adapted_rand_error, variation_of_information

from voxblock.cli import main
from voxblock.errors import VoxblockError
from voxblock.evaluate import contingency, evaluate_arrays, lut_table, merge, scores, slabs
from voxblock_testing.volumes import write_array


def skimage_scores(seg: np.ndarray, gt: np.ndarray, ignore: tuple[int, ...]) -> np.ndarray:
    """(voi_split, voi_merge, arand, precision, recall) as skimage gives them; its adapted Rand
    precision and recall are returned the other way round (scikit-image #6485)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        split, merge_ = variation_of_information(gt, seg, ignore_labels=ignore)
        arand, their_precision, their_recall = adapted_rand_error(gt, seg, ignore_labels=ignore)
    return np.array([split, merge_, arand, their_recall, their_precision], dtype=float)


def ours(table, ignore: tuple[int, ...]) -> np.ndarray:
    s = scores(table, ignore)
    return np.array([s.voi_split, s.voi_merge, s.arand, s.precision, s.recall])


def slab_table(seg: np.ndarray, gt: np.ndarray, thickness: int):
    return merge(
        contingency(seg[i : i + thickness], gt[i : i + thickness]) for i in range(0, len(seg), thickness)
    )


volumes = st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)).flatmap(
    lambda shape: st.tuples(
        hnp.arrays(np.uint64, shape, elements=st.integers(0, 5)),
        hnp.arrays(np.uint32, shape, elements=st.integers(0, 4)),
        st.integers(1, shape[0]),
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volumes, st.sampled_from([(0,), ()]))
def test_slab_tables_score_as_skimage_scores_the_whole_volume(data, ignore):
    seg, gt, thickness = data
    table = slab_table(seg, gt, thickness)
    assert table.voxels == seg.size
    expected = skimage_scores(seg, gt, ignore)
    if not np.isin(gt, ignore, invert=True).any():  # nothing counted: skimage divides 0 by 0
        assert np.isnan(ours(table, ignore)).all()
        return
    np.testing.assert_allclose(ours(table, ignore), expected, rtol=1e-9, atol=1e-9)


def test_contingency_counts_pairs_of_large_and_signed_ids():
    seg = np.array([2**63 + 5, 2**63 + 5, 7, 7, 7], dtype=np.uint64)
    gt = np.array([-1, 3, 3, 3, -1], dtype=np.int16)
    table = contingency(seg, gt)
    assert table.seg.tolist() == [7, 7, 2**63 + 5, 2**63 + 5]
    assert table.gt.tolist() == [-1, 3, -1, 3]
    assert table.counts.tolist() == [1, 2, 1, 1]


def relabel(fragments: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """What lut_table promises, plainly: LUT fragments -> segments, 0 -> 0, every other fragment
    its own segment (an id past all others)."""
    mapping = dict(zip(lut[0].tolist(), lut[1].tolist()))
    fresh = int(max(lut[1].max(initial=0), fragments.max(initial=0))) + 1
    out = np.empty_like(fragments)
    for index, f in np.ndenumerate(fragments):
        out[index] = 0 if f == 0 else mapping.get(int(f), fresh + int(f))
    return out


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.uint64, (4, 3, 5), elements=st.integers(0, 12)),
    hnp.arrays(np.uint64, (4, 3, 5), elements=st.integers(0, 3)),
    st.lists(st.tuples(st.integers(0, 12), st.integers(1, 5)), max_size=13, unique_by=lambda p: p[0]),
)
def test_lut_table_scores_as_the_relabelled_fragments(fragments, gt, pairs):
    lut = np.array(pairs, dtype=np.uint64).T.reshape(2, -1)  # segment ids 1..5 clash with fragments
    table = lut_table(slab_table(fragments, gt, 2), lut)
    expected = contingency(relabel(fragments, lut), gt)
    for ignore in ((0,), ()):
        np.testing.assert_allclose(ours(table, ignore), ours(expected, ignore), rtol=1e-12, atol=1e-12)
    assert table.voxels == fragments.size
    assert sorted(table.counts.tolist()) == sorted(expected.counts.tolist())


def test_lut_table_refuses_a_fragment_mapped_twice():
    table = contingency(np.array([1, 2], np.uint64), np.array([1, 1], np.uint64))
    with pytest.raises(VoxblockError, match="fragment 2 to more than one segment"):
        lut_table(table, np.array([[2, 2], [1, 3]], np.uint64))


def test_slabs_cover_the_region_once_on_the_chunk_grid():
    region = Roi((4, 3, 0), (40, 27, 20))
    for budget in (1, 600, 5000, 10**6):
        pieces = list(slabs(region, (0, 0, 0), (2, 1, 1), (4, 5, 6), budget))
        covered = np.zeros((22, 30, 20), int)
        for box in pieces:
            begin, end = box.begin / Coordinate(2, 1, 1), box.end / Coordinate(2, 1, 1)
            covered[tuple(slice(b, e) for b, e in zip(begin, end))] += 1
            assert all(b % c == 0 or b == r for b, c, r in zip(begin, (4, 5, 6), (2, 3, 0)))
            assert box.size // 2 <= max(budget, 4 * 5 * 6)
        assert (covered[2:, 3:, :] == 1).all() and covered.sum() == region.size // 2
    assert len(list(slabs(region, (0, 0, 0), (2, 1, 1), (4, 5, 6), 10**6))) == 1


@pytest.fixture
def volumes_on_disk(tmp_path):
    rng = np.random.default_rng(7)
    gt = np.repeat(rng.integers(0, 6, (6, 5, 4)), 4, axis=0).astype(np.uint32)  # 24 x 5 x 4
    gt[:, 0] = 0
    seg = (gt.astype(np.uint64) * 3 + (rng.random(gt.shape) < 0.1)) % 7
    other = np.where(rng.random(gt.shape) < 0.3, 9, seg).astype(np.uint64)
    names = {
        "gt": write_array(f"{tmp_path}/v.zarr/gt", gt, voxel_size=(2, 1, 1), chunk_shape=(3, 5, 4)),
        "seg": write_array(f"{tmp_path}/v.zarr/seg", seg, voxel_size=(2, 1, 1), chunk_shape=(5, 2, 2)),
        "other": write_array(f"{tmp_path}/w.zarr/other", other, voxel_size=(2, 1, 1), chunk_shape=(7, 5, 4)),
    }
    return names, {"gt": gt, "seg": seg, "other": other}


def test_evaluate_arrays_reads_slabs_and_scores_as_skimage(volumes_on_disk):
    names, data = volumes_on_disk
    for budget in (20, 1000, 10**6):
        result = evaluate_arrays(names["seg"], names["gt"], max_voxels=budget)
        got = [result.voi_split, result.voi_merge, result.arand, result.precision, result.recall]
        np.testing.assert_allclose(got, skimage_scores(data["seg"], data["gt"], (0,)), rtol=1e-9)
        assert result.voxels == np.count_nonzero(data["gt"])
    inside = evaluate_arrays(names["seg"], names["gt"], roi=Roi((8, 0, 0), (20, 5, 4)), ignore_gt=())
    expected = skimage_scores(data["seg"][4:14], data["gt"][4:14], ())
    np.testing.assert_allclose([inside.voi_split, inside.voi_merge, inside.arand], expected[:3], rtol=1e-9)


def test_cli_prints_and_writes_the_scores_of_each_segmentation(volumes_on_disk, tmp_path):
    names, data = volumes_on_disk
    out = tmp_path / "scores.json"
    args = ["evaluate", "-g", names["gt"], "-s", names["seg"], "-s", names["other"], "--json", str(out)]
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"{np.count_nonzero(data['gt'])} voxels counted (ground truth 0 ignored)" in lines[0]
    assert "ROI 0,0,0:24,5,4 (voxels)" in lines[0]
    document = json.loads(out.read_text())
    assert document["ignore_gt"] == [0] and document["voxel_size"] == [2, 1, 1]
    for line, row, key in zip(lines[2:], document["rows"], ("seg", "other"), strict=True):
        split, merge_, arand, precision, recall = skimage_scores(data[key], data["gt"], (0,))
        printed = [float(v) for v in line.split()[1:]]
        expected = [split, merge_, split + merge_, arand, precision, recall]
        np.testing.assert_allclose(printed, expected, atol=1e-6)
        assert row["segmentation"] == names[key]
        stored = [row[k] for k in ("voi_split", "voi_merge", "voi", "arand", "precision", "recall")]
        np.testing.assert_allclose(stored, expected, rtol=1e-9)
    counted = CliRunner().invoke(
        main, [*args[:5], "--count-unlabelled", "--roi", "2,0,0:3,5,4", "--no-progress"]
    )
    assert counted.exit_code == 0, counted.output
    split = skimage_scores(data["seg"][2:5], data["gt"][2:5], ())[0]
    assert float(counted.output.splitlines()[2].split()[1]) == pytest.approx(split, abs=1e-6)


def test_refusals_say_what_to_do(tmp_path, volumes_on_disk):
    names, data = volumes_on_disk
    gt = data["gt"]
    finer = write_array(f"{tmp_path}/x.zarr/finer", gt, voxel_size=(1, 1, 1))
    channels = write_array(f"{tmp_path}/x.zarr/channels", gt[None], voxel_size=(2, 1, 1), channel_dims=1)
    floats = write_array(f"{tmp_path}/x.zarr/floats", gt.astype(np.float32), voxel_size=(2, 1, 1))
    far = write_array(f"{tmp_path}/x.zarr/far", gt, voxel_size=(2, 1, 1), offset=(1000, 0, 0))
    shifted = write_array(f"{tmp_path}/x.zarr/shifted", gt, voxel_size=(2, 1, 1), offset=(2, 0, 0))
    unlabelled = write_array(f"{tmp_path}/x.zarr/zeros", np.zeros_like(gt), voxel_size=(2, 1, 1))
    refused = {
        finer: "voxel size",
        channels: "channel axis",
        floats: "labels must be integers",
        far: "do not overlap",
        unlabelled: "no voxel to count",
    }
    for name, words in refused.items():
        with pytest.raises(VoxblockError, match=words):
            evaluate_arrays(names["seg"], name)
    with pytest.raises(VoxblockError, match="do not line up"):
        off_grid = write_array(f"{tmp_path}/y.zarr/s", gt, voxel_size=(2, 1, 1), attrs={"offset": [1, 0, 0]})
        evaluate_arrays(names["seg"], off_grid)
    assert evaluate_arrays(names["seg"], shifted).voxels == np.count_nonzero(gt[:-1])  # overlap only
    result = CliRunner().invoke(main, ["evaluate", "-g", far, "-s", names["seg"]])
    assert result.exit_code == 1 and "do not overlap" in result.output
    result = CliRunner().invoke(main, ["evaluate", "-g", names["gt"]])
    assert result.exit_code == 2 and "--segmentation" in result.output


@pytest.mark.parametrize("method", ["threshold", "mws"])
def test_cli_sweep_scores_each_threshold_from_one_count_of_the_fragments(volumes_on_disk, tmp_path, method):
    from voxblock.agglomerate.graphdb import GraphSource, finalize, open_graph, write_block_partials
    from voxblock.agglomerate.rag import rag_partials
    from voxblock.agglomerate.solve import graph_lut

    names, data = volumes_on_disk
    # 12 fragments stacked along z (two planes each); the affinity across each boundary between
    # them is one of 0.1..0.9, so each threshold joins runs of them differently
    fragments = np.repeat(np.arange(1, 13, dtype=np.uint64), 2)[:, None, None] * np.ones((1, 5, 4), np.uint64)
    fragments[0, 0] = 0
    frag_name = write_array(f"{tmp_path}/v.zarr/fragments", fragments, voxel_size=(2, 1, 1))
    offsets = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    affinities = np.full((3, *fragments.shape), 0.5, np.float32)
    affinities[0, 1::2] = np.random.default_rng(3).permutation(np.linspace(0.1, 0.9, 12))[:, None, None]
    db_path = tmp_path / "rag.db"
    db = open_graph(db_path, GraphSource(str(tmp_path / "v.zarr" / "fragments"), (0, 0, 0), (2, 1, 1)))
    padded = np.pad(fragments, ((0, 1),) * 3)  # read ROI past the far side, as a block's is
    inside = tuple(slice(0, n) for n in fragments.shape)
    partials = rag_partials(padded, np.pad(affinities, ((0, 0),) + ((0, 1),) * 3), offsets, inside, (0, 0, 0))
    write_block_partials(db, 0, partials)
    finalize(db)
    db.close()

    out = tmp_path / "sweep.json"
    args = ["evaluate", "-g", names["gt"], "--fragments", frag_name, "--db", str(db_path)]
    args += ["--thresholds", "0.3,0.5,0.7", "--method", method, "--json", str(out), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["threshold"] for row in rows] == [0.3, 0.5, 0.7]
    for row, line in zip(rows, result.output.splitlines()[2:], strict=True):
        assert row["method"] == method and row["db"] == str(db_path) and line.startswith(f"{method} ")
        segments = relabel(fragments, graph_lut(db_path, method, row["threshold"]))
        split, merge_, arand, precision, recall = skimage_scores(segments, data["gt"], (0,))
        stored = [row[k] for k in ("voi_split", "voi_merge", "arand", "precision", "recall")]
        np.testing.assert_allclose(stored, [split, merge_, arand, precision, recall], rtol=1e-9)
    assert len({row["voi_merge"] for row in rows}) > 1  # the thresholds agglomerate differently
    result = CliRunner().invoke(main, ["evaluate", "-g", names["gt"], "--fragments", frag_name])
    assert result.exit_code == 2 and "--db and --thresholds" in result.output
