"""Server side: a real TPM 2.0 quote per response, made with Debian's tpm2-tools.

Each quote uses a FRESH restricted signing key (AIK) created under one storage primary and
is bound to the request by its qualifying data (the UTF-8 payload id, or its SHA-256 when
longer than the TPM accepts). There is no resource manager in front of swtpm, so every
command that loads an object is followed by `tpm2_flushcontext -t`; one lock serialises all
TPM traffic of a quoter.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: no fork-based workers there, the thread lock suffices
    fcntl = None  # type: ignore[assignment]

from nomyo.attestation import tpm_structures as ts
from nomyo.attestation.verify import Reason, parse_pcr_banks, verify_tpm_attestation
from nomyo.errors import SecurityError
from nomyo.protocol.constants import DEFAULT_PCRS, MAX_PAYLOAD_ID_CHARS

if TYPE_CHECKING:  # annotations only; never imported at run time
    from typing_extensions import Self

log = logging.getLogger(__name__)

# name -> (tpm2-tools key spec, quote scheme, quote hash)
AIK_KINDS = {
    "ecc256": ("ecc256:ecdsa-sha256:null", "ecdsa", "sha256"),
    "ecc384": ("ecc384:ecdsa-sha384:null", "ecdsa", "sha384"),
    "rsa2048": ("rsa2048:rsassa-sha256:null", "rsassa", "sha256"),
    "rsa2048-pss": ("rsa2048:rsapss-sha256:null", "rsapss", "sha256"),
}
AIK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
MAX_RAW_QUALIFYING = 64  # tpm2-tools and TPMs accept at most a TPMU_HA of qualifying data
PCR_RETRIES = 3
REQUIRED_TOOLS = ("tpm2_createprimary", "tpm2_create", "tpm2_quote", "tpm2_flushcontext")


class AttestationError(SecurityError):
    """The TPM could not produce a quote: tools missing, TPM unreachable, or a TPM error."""


def _canonical_banks(selections: tuple[ts.PcrSelection, ...]) -> str:
    return "+".join(f"{ts.HASH_ALGS[s.hash_alg][0]}:{','.join(map(str, s.indices))}"
                    for s in selections)


def _remove_dir(path: Path, owner_pid: int) -> None:
    """Remove the quoter's directory, but only in the process that created it (a forked
    worker exiting must not pull it from under its siblings)."""
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _after_fork(ref: weakref.ReferenceType[TpmQuoter]) -> None:
    quoter = ref()
    if quoter is not None:
        if quoter._lock_file is not None:
            quoter._lock_file.close()  # the parent's handle; its lock is the parent's
        quoter._reset_process_state()


class TpmQuoter:
    """Makes `tpm_attestation` blocks (docs/protocol.md) for payload ids with the TPM at `tcti`,
    e.g. `swtpm:host=127.0.0.1,port=2321` or `device:/dev/tpmrm0`."""

    def __init__(self, tcti: str, pcrs: str = DEFAULT_PCRS, *, aik: str = "ecc256",
                 timeout: float = 60.0) -> None:
        if (not isinstance(tcti, str) or not tcti or len(tcti) > 512
                or not tcti.isprintable()):
            raise ValueError("tcti must be a non-empty printable string")
        try:
            self._selections = parse_pcr_banks(pcrs)
        except ts.TpmFormatError:
            raise ValueError(f"invalid PCR selection {pcrs!r} (e.g. 'sha256:0,7,10')") from None
        if aik not in AIK_KINDS:
            raise ValueError(f"aik must be one of {sorted(AIK_KINDS)}")
        missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
        if missing:
            raise AttestationError(
                f"TPM quoting needs tpm2-tools (Debian package tpm2-tools); missing {missing}")
        self.tcti = tcti
        self.pcr_banks = _canonical_banks(self._selections)
        self._key_spec, self._scheme, self._hash = AIK_KINDS[aik]
        self._timeout = timeout
        # The tools get only what they need, never the server's other variables (API keys).
        self._env = {"PATH": os.environ.get("PATH", os.defpath), "TPM2TOOLS_TCTI": tcti}
        self._raw_binding = True  # dropped for good if the TPM refuses raw payload ids
        self._root = Path(tempfile.mkdtemp(prefix="nomyo-tpm-"))
        self._cleanup = weakref.finalize(self, _remove_dir, self._root, os.getpid())
        self._closed = False
        self._reset_process_state()
        # `nomyo serve --workers N` forks after building the quoter: each child gets its own
        # lock, lock-file handle and working directory (with its own primary).
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))
        try:
            with self._tpm():
                pass  # the first use creates this process's storage primary
        except BaseException:
            self.close()
            raise

    # ---- public ----

    def quote(self, payload_id: str) -> dict[str, Any]:
        """A fresh quote over the configured PCRs bound to `payload_id`, as the protocol's
        `tpm_attestation` block; raises `AttestationError` when the TPM fails."""
        if (not isinstance(payload_id, str) or not payload_id
                or len(payload_id) > MAX_PAYLOAD_ID_CHARS):
            raise ValueError("payload_id must be a non-empty string of sane length")
        raw = payload_id.encode("utf-8")
        with self._tpm():
            for _attempt in range(PCR_RETRIES):
                block = self._quote_once(raw)
                result = verify_tpm_attestation(block, payload_id)
                if result.valid:
                    return block
                if result.reasons != [Reason.PCR_DIGEST_MISMATCH]:
                    raise AttestationError(f"TPM produced a quote that does not verify: "
                                           f"{result.reasons}")
                log.info("PCRs changed between quote and read; quoting again")
        raise AttestationError("PCR values kept changing while quoting")

    def close(self) -> None:
        """Forget the primary's context and remove the working directory (idempotent; also
        done when the quoter is garbage-collected or the interpreter exits)."""
        with self._lock:
            self._closed = True
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
            self._cleanup()  # the directory of all processes, in the process that made it

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TpmQuoter(tcti={self.tcti!r}, pcrs={self.pcr_banks!r}, closed={self._closed})"

    # ---- exclusive use of the TPM ----

    def _reset_process_state(self) -> None:
        self._lock = threading.Lock()
        self._lock_file: BinaryIO | None = None  # flock belongs to the open file: per process
        self._workdir: Path | None = None

    @contextlib.contextmanager
    def _tpm(self) -> Iterator[None]:
        """Hold the TPM: one thread of this process, and one of the processes forked from
        the one that made the quoter (without a resource manager, `tpm2_flushcontext -t`
        would flush the objects of a concurrent user)."""
        with self._lock:
            if self._closed:
                raise AttestationError("TPM quoter is closed")
            if self._lock_file is None:
                self._lock_file = open(self._root / "tpm.lock", "ab")
            if fcntl is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                if self._workdir is None:
                    workdir = self._root / f"pid{os.getpid()}"
                    workdir.mkdir(mode=0o700, exist_ok=True)
                    self._workdir = workdir
                    self._create_primary()
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    # ---- TPM commands (caller holds the TPM) ----

    def _run(self, *args: str) -> None:
        try:
            proc = subprocess.run(args, env=self._env, cwd=self._workdir, capture_output=True,
                                  timeout=self._timeout, check=False)
        except FileNotFoundError:
            raise AttestationError(f"{args[0]} not found (Debian package tpm2-tools)") from None
        except subprocess.TimeoutExpired:
            raise AttestationError(f"{args[0]} timed out after {self._timeout} s "
                                   f"(TPM at {self.tcti})") from None
        if proc.returncode != 0:
            lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = " / ".join(lines[-2:])[:300] or f"exit status {proc.returncode}"
            raise AttestationError(f"{args[0]} failed for TPM at {self.tcti}: {detail}")

    def _run_then_flush(self, *args: str) -> None:
        """Run a command that loads objects, then flush every transient object it left."""
        try:
            self._run(*args)
        finally:
            try:
                self._run("tpm2_flushcontext", "-t")
            except AttestationError as exc:
                log.warning("could not flush transient TPM objects: %s", exc)

    def _create_primary(self) -> None:
        """ECC P-256 storage primary in the endorsement hierarchy, kept as a saved context."""
        self._run_then_flush("tpm2_createprimary", "-C", "e", "-g", "sha256", "-G", "ecc256",
                             "-c", "primary.ctx")

    def _create_aik(self) -> None:
        args = ("tpm2_create", "-C", "primary.ctx", "-g", "sha256", "-G", self._key_spec,
                "-a", AIK_ATTRIBUTES, "-u", "aik.pub", "-c", "aik.ctx")
        try:
            self._run_then_flush(*args)
        except AttestationError:
            # The primary's saved context dies with a TPM restart: make it again, once.
            log.info("re-creating the TPM storage primary")
            self._create_primary()
            self._run_then_flush(*args)

    def _quote_once(self, raw_id: bytes) -> dict[str, Any]:
        try:
            self._create_aik()
            qualifying = raw_id
            if not self._raw_binding or len(raw_id) > MAX_RAW_QUALIFYING:
                qualifying = hashlib.sha256(raw_id).digest()
            try:
                self._tpm_quote(qualifying)
            except AttestationError:
                if qualifying is not raw_id:
                    raise
                log.info("TPM refused the raw payload id as qualifying data; using SHA-256")
                self._tpm_quote(hashlib.sha256(raw_id).digest())
                self._raw_binding = False
            return self._block()
        finally:
            for name in ("aik.pub", "aik.ctx", "qualifying.bin", "quote.msg", "quote.sig",
                         "pcrs.bin"):
                (self._workdir / name).unlink(missing_ok=True)

    def _tpm_quote(self, qualifying: bytes) -> None:
        # tpm2_quote -q takes "a hex string or a file path"; a file works for any bytes.
        (self._workdir / "qualifying.bin").write_bytes(qualifying)
        self._run_then_flush(
            "tpm2_quote", "-c", "aik.ctx", "-l", self.pcr_banks, "-q", "qualifying.bin",
            "-g", self._hash, "--scheme", self._scheme, "-m", "quote.msg", "-s", "quote.sig",
            "-f", "tss", "-o", "pcrs.bin", "-F", "values")

    def _block(self) -> dict[str, Any]:
        """Assemble the protocol block from the files tpm2_quote wrote."""
        pcr_bytes = (self._workdir / "pcrs.bin").read_bytes()
        sizes = [(ts.HASH_ALGS[s.hash_alg], s.indices) for s in self._selections]
        if len(pcr_bytes) != sum(size * len(idx) for (_, size), idx in sizes):
            raise AttestationError("tpm2_quote wrote PCR values of an unexpected length")
        values: dict[str, dict[str, str]] = {}
        offset = 0
        for (bank, size), indices in sizes:
            values[bank] = {}
            for index in indices:
                values[bank][str(index)] = pcr_bytes[offset:offset + size].hex()
                offset += size
        return {
            "is_available": True,
            "pcr_banks": self.pcr_banks,
            "pcr_values": values,
            "quote_b64": base64.b64encode((self._workdir / "quote.msg").read_bytes()).decode(),
            "signature_b64": base64.b64encode((self._workdir / "quote.sig").read_bytes()).decode(),
            "aik_pubkey_b64": base64.b64encode((self._workdir / "aik.pub").read_bytes()).decode(),
        }
