"""HCCL rank tables: the JSON that tells Ascend's collective library which device holds which rank.

The format is the one MindSpore/MindFormers' `hccl_tools.py` writes (every number is a string):

    {"version": "1.0", "server_count": "1",
     "server_list": [{"server_id": "10.0.0.1",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}, ...],
                      "host_nic_ip": "reserve"}],
     "status": "completed"}

A table is built per server (device IPs from /etc/hccn.conf's `address_N=IP` lines or given explicitly) and
the per-server tables are merged into one with rank ids numbered consecutively in server order.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

from glm3.io import atomic_write_text


class RankTableError(ValueError):
    pass


_RANGE = re.compile(r"^\s*\[\s*(\d+)\s*,\s*(\d+)\s*([)\]])\s*$")
DEVICES_PER_SERVER = 8  # Ascend 910 servers: two groups of four devices, each group fully connected (HCCS)
GROUP = 4


def parse_device_range(spec: str) -> list[int]:
    """Device ids of a server's range "[first,end)", read as MindFormers' hccl_tools.py reads it: the end is
    excluded whichever bracket closes it, so "[0,8]" (what MindFormers' docs write) and "[0,8)" are the 8 devices
    0..7.

    Refused, as hccl_tools refuses them: ids outside 0..8, an empty range, and a range that crosses the boundary
    between the server's two 4-device groups without being all 8 (the groups are linked to each other only
    through the host, so HCCL cannot build such a ring)."""
    match = _RANGE.match(spec)
    if not match:
        raise RankTableError(f"device range {spec!r} is not of the form [first,end) (e.g. [0,8) or [4,8))")
    first, end = int(match[1]), int(match[2])
    if end > DEVICES_PER_SERVER:
        raise RankTableError(
            f"device range {spec!r} goes past device {DEVICES_PER_SERVER - 1}: a server has "
            f"{DEVICES_PER_SERVER} devices, and the end is excluded ([0,8) is all of them)"
        )
    if end <= first:
        raise RankTableError(f"device range {spec!r} is empty (the end is excluded)")
    if first < GROUP < end and (first, end) != (0, DEVICES_PER_SERVER):
        raise RankTableError(
            f"device range {spec!r} crosses the boundary between the server's two groups of "
            f"{GROUP} devices (0-3 and 4-7), which HCCL cannot ring: use devices within one "
            f"group ([0,{GROUP}) or [{GROUP},8) or a part of one) or all 8 ([0,8))"
        )
    return list(range(first, end))


def _check_ip(ip: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(ip.strip()))
    except ValueError:
        raise RankTableError(f"{what} {ip!r} is not a valid IP address") from None


def read_hccn_conf(path: str | os.PathLike) -> dict[int, str]:
    """{device id: device IP} from an hccn.conf-style file (`address_N=IP`; other lines are ignored)."""
    ips: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            match = re.match(r"^\s*address_(\d+)\s*=\s*(\S+)\s*$", line)
            if not match:
                continue
            device = int(match[1])
            if device in ips:
                raise RankTableError(f"{path}:{lineno}: address_{device} is given twice")
            ips[device] = _check_ip(match[2], f"{path}:{lineno}: address_{device}")
    return ips


def build_rank_table(
    server_ip: str,
    devices: str | list[int] = "[0,8)",
    device_ips: dict[int, str] | list[str] | None = None,
    hccn_conf: str | os.PathLike | None = None,
) -> dict:
    """The rank table of one server. Device IPs come from `device_ips` (a list in device order or a
    {device id: IP} map) or from `hccn_conf`; every device in the range must have one."""
    ids = parse_device_range(devices) if isinstance(devices, str) else list(devices)
    if (device_ips is None) == (hccn_conf is None):
        raise RankTableError("give the device IPs either explicitly or through an hccn.conf file (exactly one)")
    if hccn_conf is not None:
        ips = read_hccn_conf(hccn_conf)
    elif isinstance(device_ips, dict):
        ips = {int(k): v for k, v in device_ips.items()}
    else:
        if len(device_ips) != len(ids):
            raise RankTableError(f"{len(device_ips)} device IPs given for {len(ids)} devices {ids}")
        ips = dict(zip(ids, device_ips))
    missing = [d for d in ids if d not in ips]
    if missing:
        raise RankTableError(f"no IP for device(s) {missing}" + (f" in {hccn_conf}" if hccn_conf else ""))
    table = {
        "version": "1.0",
        "server_count": "1",
        "server_list": [
            {
                "server_id": _check_ip(server_ip, "server ip"),
                "device": [
                    {"device_id": str(d), "device_ip": _check_ip(ips[d], f"device {d} IP"), "rank_id": str(rank)}
                    for rank, d in enumerate(ids)
                ],
                "host_nic_ip": "reserve",
            }
        ],
        "status": "completed",
    }
    validate_rank_table(table)
    return table


def merge_rank_tables(tables: list[dict]) -> dict:
    """One table for all servers, in the given order, rank ids renumbered 0..N-1 across servers."""
    if not tables:
        raise RankTableError("nothing to merge")
    for table in tables:
        validate_rank_table(table)
    servers, rank = [], 0
    for table in tables:
        for server in table["server_list"]:
            devices = []
            for device in server["device"]:
                devices.append(
                    {"device_id": device["device_id"], "device_ip": device["device_ip"], "rank_id": str(rank)}
                )
                rank += 1
            servers.append(
                {
                    "server_id": server["server_id"],
                    "device": devices,
                    "host_nic_ip": server.get("host_nic_ip", "reserve"),
                }
            )
    merged = {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}
    validate_rank_table(merged)
    return merged


def build_cluster_table(servers: list[dict]) -> dict:
    """The rank table of every server, in order: each {"ip", "devices" (default all 8), "hccn_conf" or
    "device_ips"} (params.yaml's parallel.servers)."""
    return merge_rank_tables(
        [
            build_rank_table(
                s["ip"], s.get("devices", "[0,8)"), device_ips=s.get("device_ips"), hccn_conf=s.get("hccn_conf")
            )
            for s in servers
        ]
    )


def launch_nodes(world_size: int, table: dict | None = None) -> list[dict]:
    """Where msrun starts the workers: [{"ip", "local_workers", "node_rank"}], one node per server of `table`
    with as many workers as it has devices (they must add up to `world_size`), or this host alone."""
    if table is None:
        nodes = [{"ip": "127.0.0.1", "local_workers": world_size}]
    else:
        nodes = [{"ip": s["server_id"], "local_workers": len(s["device"])} for s in table["server_list"]]
        devices = sum(n["local_workers"] for n in nodes)
        if devices != world_size:
            raise RankTableError(
                f"the servers have {devices} devices but data_parallel*model_parallel*pipeline_stage is {world_size}"
            )
    return [{**node, "node_rank": rank} for rank, node in enumerate(nodes)]


def validate_rank_table(table: dict) -> None:
    """Raise RankTableError naming the first problem: missing keys, bad IPs, duplicates, counts that disagree."""
    for key in ("version", "server_count", "server_list", "status"):
        if key not in table:
            raise RankTableError(f"rank table has no {key!r}")
    servers = table["server_list"]
    if not isinstance(servers, list) or not servers:
        raise RankTableError("rank table has an empty server_list")
    if str(table["server_count"]) != str(len(servers)):
        raise RankTableError(f"server_count is {table['server_count']} but server_list has {len(servers)} servers")
    seen_servers, seen_ips, ranks = set(), {}, []
    per_server = set()
    for server in servers:
        sid = _check_ip(str(server.get("server_id", "")), "server_id")
        if sid in seen_servers:
            raise RankTableError(f"server {sid} appears twice")
        seen_servers.add(sid)
        devices = server.get("device") or []
        if not devices:
            raise RankTableError(f"server {sid} has no devices")
        per_server.add(len(devices))
        seen_ids = set()
        for device in devices:
            did, ip = str(device.get("device_id", "")), str(device.get("device_ip", ""))
            if not did.isdigit():
                raise RankTableError(f"server {sid}: device_id {did!r} is not a non-negative integer")
            if did in seen_ids:
                raise RankTableError(f"server {sid}: device {did} appears twice")
            seen_ids.add(did)
            ip = _check_ip(ip, f"server {sid} device {did} device_ip")
            if ip in seen_ips:
                raise RankTableError(f"device IP {ip} is used by both {seen_ips[ip]} and server {sid} device {did}")
            seen_ips[ip] = f"server {sid} device {did}"
            rank = str(device.get("rank_id", ""))
            if not rank.isdigit():
                raise RankTableError(f"server {sid} device {did}: rank_id {rank!r} is not a non-negative integer")
            ranks.append(int(rank))
    if len(per_server) > 1:
        raise RankTableError(
            f"servers have different device counts {sorted(per_server)}; HCCL needs the same number on every server"
        )
    if sorted(ranks) != list(range(len(ranks))):
        raise RankTableError(f"rank ids {sorted(ranks)} are not 0..{len(ranks) - 1}, each once")


def load_rank_table(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except json.JSONDecodeError as e:
        raise RankTableError(f"{path}: not JSON ({e})") from None
    try:
        validate_rank_table(table)
    except RankTableError as e:
        raise RankTableError(f"{path}: {e}") from None
    return table


def save_rank_table(table: dict, path: str | os.PathLike) -> str:
    validate_rank_table(table)
    atomic_write_text(path, json.dumps(table, indent=4) + "\n")
    return os.fspath(path)
