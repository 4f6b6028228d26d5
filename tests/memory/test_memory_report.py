"""The protection report: published keys, added keys, and values that follow reality."""
import json

import nomyo
from nomyo.memory import SecureBuffer, settings
from tests.helpers import run_python

PUBLISHED = {"enabled": bool, "platform": str, "protection_level": str,
             "has_memory_locking": bool, "has_secure_zeroing": bool,
             "supports_full_protection": bool, "page_size": int}
ADDED = {"backend": str, "allocator": str, "can_lock": bool, "dump_excluded": bool,
         "core_dumps_disabled": bool, "method": str, "is_platform_secure": bool}


def test_report_has_every_key_with_its_type():
    info = nomyo.get_memory_protection_info()
    for key, kind in {**PUBLISHED, **ADDED}.items():
        assert isinstance(info[key], kind), key
    for key in ("memlock_limit", "locked_bytes", "dumpable", "core_limit"):
        assert key in info
    assert info["protection_level"] in ("full", "zeroing_only", "none")
    assert info["method"] in ("mlock", "zero-only", "none")
    assert info["allocator"] in ("memfd_secret", "mmap", "heap")
    assert info["backend"] == "native"
    json.dumps(info)


def test_full_only_when_locking_and_dump_exclusion_work_here():
    info = nomyo.get_memory_protection_info()
    full = info["can_lock"] and info["dump_excluded"] and info["enabled"]
    assert (info["protection_level"] == "full") == full
    assert info["is_platform_secure"] == full == info["supports_full_protection"]


def test_locked_bytes_follow_live_buffers():
    before = nomyo.get_memory_protection_info()["locked_bytes"]
    buf = SecureBuffer(64 * 1024)
    during = nomyo.get_memory_protection_info()["locked_bytes"]
    buf.close()
    after = nomyo.get_memory_protection_info()["locked_bytes"]
    assert during - before >= 64 * 1024 and after == before


def test_disable_stops_locking_and_enable_restores_it():
    try:
        nomyo.disable_secure_memory()
        info = nomyo.get_memory_protection_info()
        with SecureBuffer(16) as unlocked:
            assert not unlocked.locked
        assert info["enabled"] is False and info["protection_level"] == "zeroing_only"
        assert info["method"] == "zero-only"
    finally:
        nomyo.enable_secure_memory()
    with SecureBuffer(16) as locked:
        assert locked.locked
    assert settings.enabled()


def test_fail_closed_mode_cannot_be_switched_off_in_code():
    proc = run_python("""
        import nomyo
        try:
            nomyo.disable_secure_memory()
        except nomyo.SecurityError as exc:
            print("refused", exc)
        print(nomyo.get_memory_protection_info()["fail_closed"])
    """, NOMYO_REQUIRE_SECURE_MEMORY="1")
    assert proc.stdout.splitlines() [0].startswith("refused") and "True" in proc.stdout


def test_import_nomyo_stays_light():
    proc = run_python("""
        import sys, nomyo
        nomyo.get_memory_protection_info()
        print(sorted(m for m in ("requests", "cryptography", "urllib3") if m in sys.modules))
    """)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_stale_build_is_reported_as_such():
    """Compiled helpers built for another version are refused by name, never half-used."""
    proc = run_python("""
        import json
        import nomyo._version
        nomyo._version.__version__ = "9.9.9"  # as if the package were upgraded, not rebuilt
        import nomyo
        from nomyo.protocol import b64
        info = nomyo.get_memory_protection_info()
        print(json.dumps([info["backend"], info["fallback_reason"], b64.NATIVE]))
    """)
    backend, reason, codec = json.loads(proc.stdout.splitlines()[-1])
    assert backend == "fallback" and codec is False
    assert "stale build" in reason
    assert f"built for nomyo {nomyo_version()}, this is nomyo 9.9.9" in reason


def test_a_build_from_other_c_sources_is_stale_in_a_source_checkout():
    """An editable install rebuilt in one venv and not in another used to run the old C code
    in the second (only the version was compared): the digest of csrc/ is compared too."""
    from nomyo import _buildstamp
    from nomyo.memory import binding

    assert _buildstamp.checkout_sources() is not None, "these tests run from a source checkout"
    assert binding.stale_build("m", _buildstamp.stamp(nomyo_version(),
                                                       _buildstamp.checkout_sources())) is None
    proc = run_python("""
        import json
        from nomyo import _buildstamp
        _buildstamp.source_digest = lambda csrc: "0123456789ab"  # as if csrc/ had changed
        import nomyo
        from nomyo.protocol import b64
        info = nomyo.get_memory_protection_info()
        print(json.dumps([info["backend"], info["fallback_reason"], b64.NATIVE]))
    """)
    backend, reason, codec = json.loads(proc.stdout.splitlines()[-1])
    assert backend == "fallback" and codec is False
    assert "built from other C sources than csrc/ holds now" in reason


def nomyo_version() -> str:
    from nomyo import __version__

    return __version__
