#!/usr/bin/env python
"""Fetch onnxruntime's C and C++ API headers, which dino_d2's custom op library is compiled against.

The onnxruntime wheel ships no headers. Debian's ``libonnxruntime-dev`` does (Debian 13 "trixie"
is its first release that packages onnxruntime): this script downloads that package with
``apt-get download`` from the Debian mirror this machine's apt already uses, into a private apt
state (the machine's package lists and installed packages are left as they are), and unpacks
its ``usr/include/onnxruntime`` into DEST. Nothing is installed and nothing is run from the
package. The library built against these headers links nothing of onnxruntime and loads into any
onnxruntime at least as new as them (``dino_d2.export.msda_node``).

    python tools/fetch_onnxruntime_headers.py .venv/include/onnxruntime

Where the headers cannot be had (no apt, no network, another distribution), it says why and
exits with 0: dino_d2 then builds without the onnxruntime custom op (onnxruntime still runs the
GridSample exports, and OpenVINO the node ones). ``--strict`` exits with 1 instead.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

# Debian's first release with libonnxruntime-dev, and the package.
SUITE = "trixie"
PACKAGE = "libonnxruntime-dev"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Headers dino_d2's library includes; a folder holding them is complete.
NEEDED = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h")


def has_headers(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in NEEDED)


def debian_mirror() -> str:
    """The URI of the main Debian archive among this machine's apt sources, as apt reports them
    (``apt-get indextargets``): the first whose release is a plain codename (not ``-security``
    or ``-updates``)."""
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get is not on PATH (not a Debian-based machine)")
    listed = subprocess.run(
        ["apt-get", "indextargets", "--no-release-info", "--format", "$(REPO_URI) $(RELEASE)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for line in listed.stdout.splitlines():
        uri, _, release = line.partition(" ")
        if release and "-" not in release:
            return uri
    raise RuntimeError(f"apt lists no Debian archive ({listed.stderr.strip()[-300:]})")


def fetch(dest: str, mirror: str) -> None:
    """Downloads and unpacks the package's headers into ``dest``; raises RuntimeError on failure."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not on PATH (not a Debian-based machine)")
    if not os.path.isfile(KEYRING):
        raise RuntimeError(f"{KEYRING} is missing (install debian-archive-keyring)")
    with tempfile.TemporaryDirectory(prefix="dino_d2-onnxruntime-") as work:
        parts = os.path.join(work, "sources.list.d")
        os.makedirs(parts)
        for sub in ("lists/partial", "cache/archives/partial"):
            os.makedirs(os.path.join(work, sub))
        with open(os.path.join(parts, f"{SUITE}.sources"), "w", encoding="utf-8") as f:
            f.write(
                f"Types: deb\nURIs: {mirror}\nSuites: {SUITE}\nComponents: main\n"
                f"Signed-By: {KEYRING}\n"
            )
        empty = os.path.join(work, "sources.list")
        open(empty, "w").close()
        options = [
            f"-oDir::Etc::sourcelist={empty}",
            f"-oDir::Etc::sourceparts={parts}",
            f"-oDir::State::Lists={work}/lists",
            f"-oDir::Cache={work}/cache",
            "-oDebug::NoLocking=1",
        ]
        if os.geteuid() == 0:
            options.append("-oAPT::Sandbox::User=root")
        for command in (["update"], ["download", PACKAGE]):
            done = subprocess.run(
                ["apt-get", "-q", *options, *command],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"apt-get {' '.join(command)} failed: {done.stderr.strip()[-500:]}"
                )
        debs = glob.glob(os.path.join(work, f"{PACKAGE}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download left {debs}, expected one {PACKAGE} package")
        unpacked = os.path.join(work, "unpacked")
        subprocess.run(["dpkg-deb", "-x", debs[0], unpacked], check=True, timeout=300)
        source = os.path.join(unpacked, "usr", "include", "onnxruntime")
        if not has_headers(source):
            raise RuntimeError(f"{os.path.basename(debs[0])} lacks {list(NEEDED)}")
        staging = dest + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
        print(f"fetch_onnxruntime_headers: {os.path.basename(debs[0])} -> {dest}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="folder to hold the headers (e.g. .venv/include/onnxruntime)")
    parser.add_argument("--mirror", help="Debian archive URI (default: the one apt uses here)")
    parser.add_argument("--strict", action="store_true", help="exit with 1 when they cannot be had")
    args = parser.parse_args(argv)
    if has_headers(args.dest):
        print(f"fetch_onnxruntime_headers: {args.dest} already holds the headers")
        return 0
    try:
        fetch(os.path.abspath(args.dest), args.mirror or debian_mirror())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(
            f"fetch_onnxruntime_headers: cannot fetch {PACKAGE} ({e}); dino_d2 builds without "
            "its onnxruntime custom op (--msda-backend node exports then run in OpenVINO only)",
            file=sys.stderr,
        )
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
