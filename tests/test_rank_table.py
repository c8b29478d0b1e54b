"""HCCL rank tables: build from hccn.conf or a list, merge servers, reject bad input; and the CLI."""

import json
import subprocess
import sys

import pytest

from glm3.train.rank_table import (
    RankTableError,
    build_rank_table,
    load_rank_table,
    merge_rank_tables,
    parse_device_range,
    read_hccn_conf,
    validate_rank_table,
)

HCCN = "".join(f"address_{i}=192.168.10{i % 4}.{i + 10}\nnetmask_{i}=255.255.255.0\n" for i in range(8))

# One 8-device server, written out by hand in the reference (hccl_tools) format: every value a string.
EXPECTED_ONE_SERVER = {
    "version": "1.0",
    "server_count": "1",
    "server_list": [
        {
            "server_id": "10.0.0.1",
            "device": [
                {"device_id": "0", "device_ip": "192.168.100.10", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.168.101.11", "rank_id": "1"},
                {"device_id": "2", "device_ip": "192.168.102.12", "rank_id": "2"},
                {"device_id": "3", "device_ip": "192.168.103.13", "rank_id": "3"},
                {"device_id": "4", "device_ip": "192.168.100.14", "rank_id": "4"},
                {"device_id": "5", "device_ip": "192.168.101.15", "rank_id": "5"},
                {"device_id": "6", "device_ip": "192.168.102.16", "rank_id": "6"},
                {"device_id": "7", "device_ip": "192.168.103.17", "rank_id": "7"},
            ],
            "host_nic_ip": "reserve",
        }
    ],
    "status": "completed",
}


def test_device_ranges_read_as_mindformers_hccl_tools_reads_them():
    # The end is excluded whichever bracket closes it: "[0,8]" is MindFormers' own way of writing all 8.
    for spec, devices in (
        ("[0,8)", range(8)),
        ("[0,8]", range(8)),
        ("[4, 8]", range(4, 8)),
        ("[0,4)", range(4)),
        ("[2,4]", range(2, 4)),
        ("[5,6)", [5]),
        ("[4,8)", range(4, 8)),
    ):
        assert parse_device_range(spec) == list(devices), spec
    for bad, why in (
        ("0-8", "not of the form"),
        ("[8,0)", "empty"),
        ("[3,3)", "empty"),
        ("[0,9)", "past device 7"),
        ("[0,7]", "crosses the boundary"),
        ("[2,6)", "crosses the boundary"),
        ("[3,8)", "crosses the boundary"),
    ):
        with pytest.raises(RankTableError, match=why):
            parse_device_range(bad)


def test_the_seeds_closed_looking_range_builds_the_8_device_table(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text(HCCN)
    assert build_rank_table("10.0.0.1", "[0,8]", hccn_conf=conf) == EXPECTED_ONE_SERVER


def test_build_from_hccn_conf_matches_the_reference_format(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text(HCCN)
    assert read_hccn_conf(conf)[3] == "192.168.103.13"
    assert build_rank_table("10.0.0.1", "[0,8)", hccn_conf=conf) == EXPECTED_ONE_SERVER
    half = build_rank_table("10.0.0.1", "[4,8)", hccn_conf=conf)
    assert [(d["device_id"], d["rank_id"]) for d in half["server_list"][0]["device"]] == [
        ("4", "0"),
        ("5", "1"),
        ("6", "2"),
        ("7", "3"),
    ]


def test_build_from_a_list_and_merge_numbers_ranks_in_server_order():
    a = build_rank_table("10.0.0.1", "[0,2)", device_ips=["192.168.1.1", "192.168.1.2"])
    b = build_rank_table("10.0.0.2", "[0,2)", device_ips=["192.168.2.1", "192.168.2.2"])
    merged = merge_rank_tables([b, a])
    assert merged["server_count"] == "2" and merged["status"] == "completed"
    assert [s["server_id"] for s in merged["server_list"]] == ["10.0.0.2", "10.0.0.1"]
    assert [(d["device_ip"], d["rank_id"]) for s in merged["server_list"] for d in s["device"]] == [
        ("192.168.2.1", "0"),
        ("192.168.2.2", "1"),
        ("192.168.1.1", "2"),
        ("192.168.1.2", "3"),
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t["server_list"][0]["device"][1].update(device_id="0"), "device 0 appears twice"),
        (lambda t: t["server_list"][0]["device"][1].update(device_ip="192.168.100.10"), "used by both"),
        (lambda t: t["server_list"][0]["device"][2].update(device_ip="192.168.300.1"), "not a valid IP"),
        (lambda t: t.update(server_count="2"), "server_count is 2"),
        (lambda t: t["server_list"][0]["device"][3].update(rank_id="9"), "rank ids"),
        (lambda t: t.pop("status"), "no 'status'"),
    ],
)
def test_invalid_tables_are_rejected(change, message):
    table = json.loads(json.dumps(EXPECTED_ONE_SERVER))
    change(table)
    with pytest.raises(RankTableError, match=message):
        validate_rank_table(table)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(RankTableError, match="2 device IPs given for 4 devices"):
        build_rank_table("10.0.0.1", "[0,4)", device_ips=["1.1.1.1", "1.1.1.2"])
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.168.1.1\naddress_1=192.168.1.2\n")
    with pytest.raises(RankTableError, match=r"no IP for device\(s\) \[2, 3\]"):
        build_rank_table("10.0.0.1", "[0,4)", hccn_conf=conf)
    conf.write_text("address_0=192.168.1.1\naddress_0=192.168.1.2\n")
    with pytest.raises(RankTableError, match="hccn.conf:2: address_0 is given twice"):
        read_hccn_conf(conf)
    with pytest.raises(RankTableError, match="server ip"):
        build_rank_table("server-a", "[0,1)", device_ips=["1.1.1.1"])
    a = build_rank_table("10.0.0.1", "[0,2)", device_ips=["192.168.1.1", "192.168.1.2"])
    b = build_rank_table("10.0.0.2", "[0,1)", device_ips=["192.168.2.1"])
    with pytest.raises(RankTableError, match="different device counts"):
        merge_rank_tables([a, b])
    with pytest.raises(RankTableError, match="appears twice"):
        merge_rank_tables([a, a])


def test_cli_builds_and_merges(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text(HCCN)
    glm3 = [sys.executable, "-m", "glm3.cli", "rank-table"]
    one = subprocess.run(
        [*glm3, "--server-ip", "10.0.0.1", "--hccn-conf", str(conf), "--out", str(tmp_path / "a.json")],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    assert json.loads((tmp_path / "a.json").read_text()) == EXPECTED_ONE_SERVER
    ips = ",".join(f"192.168.20{i % 4}.{i + 10}" for i in range(8))
    two = subprocess.run(
        [*glm3, "--server-ip", "10.0.0.2", "--device-ips", ips, "--out", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr
    merged = subprocess.run(
        [*glm3, "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "all.json")],
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 0 and "2 server(s), 16 rank(s)" in merged.stdout
    table = load_rank_table(tmp_path / "all.json")
    assert [d["rank_id"] for s in table["server_list"] for d in s["device"]] == [str(i) for i in range(16)]
    bad = subprocess.run(
        [*glm3, "merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "bad.json")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "appears twice" in bad.stderr and not (tmp_path / "bad.json").exists()
