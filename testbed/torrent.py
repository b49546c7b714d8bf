"""BitTorrent parts for the benchmark's comparison system: opentracker, mktorrent, aria2c.

Everything is a real Debian package (`apt-get install opentracker aria2 mktorrent`); this module only
writes their configs and command lines, computes info hashes (the tracker runs in whitelist mode) and
asks the tracker's scrape endpoint whether the seeder has announced.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

TOOLS = {"opentracker": "opentracker", "aria2c": "aria2", "mktorrent": "mktorrent"}
TRACKER_PORT = 6969
PEER_PORT = 6881
TRACKER_USER = "_opentracker"  # created by the Debian package; opentracker refuses to stay root


def missing_tools() -> list[str]:
    """Debian packages to install for the BitTorrent system (empty when all are there)."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def ensure_tools() -> None:
    """apt-get install whatever is missing (root only); raise with the reason if that fails."""
    missing = missing_tools()
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", *missing]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # maybe the package lists are stale or absent
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or missing_tools():
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-1000:]}")


# ---------------------------------------------------------------------------------------------------
# bencode (just enough to find the info dict)
# ---------------------------------------------------------------------------------------------------


def _skip(data: bytes, i: int) -> int:
    """Index just past the bencoded value starting at `i`."""
    c = data[i : i + 1]
    if c == b"i":
        return data.index(b"e", i) + 1
    if c in (b"l", b"d"):
        i += 1
        while data[i : i + 1] != b"e":
            i = _skip(data, i)
        return i + 1
    colon = data.index(b":", i)
    return colon + 1 + int(data[i:colon])


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    colon = data.index(b":", i)
    end = colon + 1 + int(data[i:colon])
    return data[colon + 1 : end], end


def info_hash(torrent: bytes) -> str:
    """Hex SHA-1 of the raw bencoded `info` dict: the torrent's identity for trackers and peers."""
    if torrent[:1] != b"d":
        raise ValueError("not a bencoded dict")
    i = 1
    while torrent[i : i + 1] != b"e":
        key, i = _string(torrent, i)
        end = _skip(torrent, i)
        if key == b"info":
            return hashlib.sha1(torrent[i:end]).hexdigest()
        i = end
    raise ValueError("torrent has no info dict")


def scrape_complete(tracker_url: str, hex_hash: str) -> int:
    """Seeders the tracker knows for `hex_hash` (its /scrape answer), 0 if it is not listed."""
    quoted = urllib.parse.quote_from_bytes(bytes.fromhex(hex_hash))
    url = tracker_url.replace("/announce", "/scrape") + f"?info_hash={quoted}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = resp.read()
    marker = b"8:completei"
    at = body.find(marker)
    return int(body[at + len(marker) : body.index(b"e", at + len(marker))]) if at >= 0 else 0


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------


def make_torrent(content: Path, out: Path, tracker_url: str, piece_log2: int = 20) -> str:
    """mktorrent a file or directory (1 MiB pieces by default); returns the info hash."""
    out.unlink(missing_ok=True)
    cmd = ["mktorrent", "-a", tracker_url, "-l", str(piece_log2), "-o", str(out), "-p", str(content)]
    subprocess.run(cmd, check=True, capture_output=True)
    return info_hash(out.read_bytes())


def tracker_files(chroot: Path, hashes: list[str]) -> Path:
    """Write opentracker's config and whitelist into `chroot`; return the config path.

    opentracker chroots into its -d directory before it reads the whitelist, so `access.whitelist`
    names the file as seen from inside (`/whitelist.txt`).
    """
    chroot.mkdir(parents=True, exist_ok=True)
    chroot.chmod(0o755)
    (chroot / "whitelist.txt").write_text("".join(h + "\n" for h in hashes))
    config = chroot / "opentracker.conf"
    config.write_text("access.whitelist /whitelist.txt\n")
    return config


def tracker_command(ip: str, chroot: Path, config: Path) -> list[str]:
    return [
        "opentracker", "-i", ip, "-p", str(TRACKER_PORT), "-P", str(TRACKER_PORT),
        "-f", str(config), "-d", str(chroot), "-u", TRACKER_USER,
    ]  # fmt: skip


def aria2_command(
    torrent: Path, directory: Path, seeder: bool = False, hook: Path | None = None
) -> list[str]:
    """aria2c for one swarm member: seeds until killed; `hook` runs once the download is verified.

    DHT and local peer discovery are off (only the tracker and peer exchange find peers, as in a
    private swarm); no upload limit; files are not preallocated.
    """
    cmd = [
        "aria2c", f"--dir={directory}", "--seed-ratio=0.0", "--enable-dht=false", "--enable-dht6=false",
        "--bt-enable-lpd=false", "--enable-peer-exchange=true", "--file-allocation=none",
        "--disable-ipv6=true", "--summary-interval=0", "--console-log-level=warn",
        f"--listen-port={PEER_PORT}", "--bt-max-peers=0", "--max-overall-upload-limit=0",
        "--auto-file-renaming=false", "--allow-overwrite=true", "--bt-save-metadata=false",
    ]  # fmt: skip
    if seeder:
        cmd.append("--check-integrity=true")
    if hook is not None:
        cmd.append(f"--on-bt-download-complete={hook}")
    return [*cmd, str(torrent)]


def completion_hook(path: Path, marker: Path) -> Path:
    """A hook script for aria2c that creates `marker` (aria2c calls it with GID, count, first path)."""
    path.write_text(f'#!/bin/sh\ntouch "{marker}"\n')
    path.chmod(0o755)
    return path
