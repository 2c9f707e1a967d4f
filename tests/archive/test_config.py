from pathlib import Path

import pytest

from archive.config import AllowedCaller, ConfigError, DuplicatePolicy, load_settings


def test_defaults(tmp_path):
    s = load_settings(env={}, data_dir=str(tmp_path))
    assert s.ae_title == "TELEPACS"
    assert s.dicom_port == 11112
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8042)
    assert s.db_url == f"sqlite:///{tmp_path / 'index.sqlite3'}"
    assert s.storage_url == (tmp_path / "objects").as_uri()
    assert s.duplicate_policy is DuplicatePolicy.KEEP_NEWER


def test_toml_then_environment(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(
        f'data_dir = "{tmp_path}"\n'
        "[dicom]\nae_title = \"HUB\"\nport = 104\n"
        "allowed_callers = [{ ae = \"CT1\", host = \"10.0.0.5\" }, \"MR1\"]\n"
        "[dicom.facilities]\nCT1 = \"BV-HUYEN-A\"\n"
        "[ingest]\nduplicate_policy = \"reject\"\n"
    )
    env = {"TELEPACS_DICOM_PORT": "11113", "TELEPACS_STORAGE_URL": "s3://a:b@h:9000/bkt?secure=false"}
    s = load_settings(cfg, env=env)
    assert s.ae_title == "HUB"
    assert s.dicom_port == 11113  # the environment wins over the file
    assert s.storage_url.startswith("s3://")
    assert s.duplicate_policy is DuplicatePolicy.REJECT
    assert s.allowed_callers == (AllowedCaller("CT1", "10.0.0.5"), AllowedCaller("MR1"))
    assert s.facility_for("CT1") == "BV-HUYEN-A"
    assert s.caller_allowed("CT1", "10.0.0.5")
    assert not s.caller_allowed("CT1", "10.0.0.6")
    assert s.caller_allowed("MR1", "anywhere")
    assert not s.caller_allowed("EVIL", "10.0.0.5")


def test_environment_lists(tmp_path):
    env = {"TELEPACS_ALLOWED_CALLERS": "CT1@10.0.0.5,MR1", "TELEPACS_FACILITIES": "CT1=A,MR1=B"}
    s = load_settings(env=env, data_dir=str(tmp_path))
    assert s.allowed_callers == (AllowedCaller("CT1", "10.0.0.5"), AllowedCaller("MR1"))
    assert dict(s.facilities) == {"CT1": "A", "MR1": "B"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TELEPACS_DICOM_PORT": "eleven"}, "DICOM port must be an integer"),
        ({"TELEPACS_HTTP_PORT": "70000"}, "HTTP port must be a TCP port"),
        ({"TELEPACS_AE_TITLE": "A" * 17}, "AE title must be 1-16"),
        ({"TELEPACS_DUPLICATE_POLICY": "merge"}, "duplicate_policy must be one of"),
    ],
)
def test_bad_settings_say_what_is_wrong(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env, data_dir=str(tmp_path))


def test_unknown_toml_key_is_refused(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[dicom]\naetitle = \"X\"\n")
    with pytest.raises(ConfigError, match="unknown setting \\[dicom\\] aetitle"):
        load_settings(cfg, env={})


def test_data_dir_toml_is_read(tmp_path):
    (tmp_path / "telepacs.toml").write_text("[http]\nport = 9000\n")
    s = load_settings(env={"TELEPACS_DATA_DIR": str(tmp_path)})
    assert s.http_port == 9000
    assert s.data_dir == Path(tmp_path).resolve()


def test_move_destinations_from_toml_and_environment(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[dicom.destinations]\nWORKSTATION = "10.0.0.7:104"\nPACS2 = "pacs.example:11112"\n')
    s = load_settings(cfg, env={}, data_dir=str(tmp_path))
    assert dict(s.move_destinations) == {"WORKSTATION": ("10.0.0.7", 104), "PACS2": ("pacs.example", 11112)}
    env = {"TELEPACS_MOVE_DESTINATIONS": "WS1=10.0.0.7:104, WS2=host:11113"}
    s = load_settings(cfg, env=env, data_dir=str(tmp_path))  # the environment wins over the file
    assert dict(s.move_destinations) == {"WS1": ("10.0.0.7", 104), "WS2": ("host", 11113)}
    assert dict(load_settings(env={}, data_dir=str(tmp_path)).move_destinations) == {}


@pytest.mark.parametrize(
    "value, message",
    [
        ("WS1", "must look like AE=host:port"),
        ("WS1=10.0.0.7", "move destination WS1 must be host:port"),
        ("WS1=:104", "move destination WS1 must be host:port"),
        ("WS1=h:abc", "move destination WS1 port must be an integer"),
        ("WS1=h:70000", "move destination WS1 port must be a TCP port"),
        ("WS1=h:0", "needs a port other than 0"),
        ("ABCDEFGHIJKLMNOPQ=h:104", "move destination AE title must be 1-16"),
    ],
)
def test_bad_move_destinations_say_what_is_wrong(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env={"TELEPACS_MOVE_DESTINATIONS": value}, data_dir=str(tmp_path))


def test_move_destinations_toml_must_be_a_table(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[dicom]\ndestinations = ["WS1"]\n')
    with pytest.raises(ConfigError, match="dicom.destinations must be a table"):
        load_settings(cfg, env={}, data_dir=str(tmp_path))


# -- forwarding rules ---------------------------------------------------------

from archive.config import ForwardRule  # noqa: E402


def test_forward_rules_from_toml(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(
        "[dicom.destinations]\nHUB = \"10.0.0.1:104\"\nHUB2 = \"10.0.0.2:104\"\n"
        "[forward]\nretry_initial = 0.5\nretry_max = 30\nmax_attempts = 3\n"
        "[[forward.rules]]\ndestination = \"HUB\"\ncalling_ae = \"CT1\"\nmodality = \"ct\"\n"
        "[[forward.rules]]\ndestination = \"HUB2\"\n"
    )
    s = load_settings(cfg, env={})
    assert s.forward_rules == (ForwardRule("HUB", "CT1", "CT"), ForwardRule("HUB2"))
    assert [r.key for r in s.forward_rules] == ["HUB:calling_ae=CT1,modality=CT", "HUB2:*"]
    assert (s.forward_retry_initial, s.forward_retry_max, s.forward_max_attempts) == (0.5, 30.0, 3)


def test_forward_rules_from_environment(tmp_path):
    env = {"TELEPACS_MOVE_DESTINATIONS": "HUB=h:104,HUB2=h2:11112",
           "TELEPACS_FORWARD_RULES": "HUB:calling_ae=CT1,modality=CT; HUB2:* ;HUB:modality=MR",
           "TELEPACS_FORWARD_RETRY_INITIAL": "0.1", "TELEPACS_FORWARD_MAX_ATTEMPTS": "2"}
    s = load_settings(env=env, data_dir=str(tmp_path))
    assert s.forward_rules == (ForwardRule("HUB", "CT1", "CT"), ForwardRule("HUB2"), ForwardRule("HUB", None, "MR"))
    assert s.forward_retry_initial == 0.1 and s.forward_max_attempts == 2
    # Keys round-trip through the env syntax.
    again = load_settings(env={**env, "TELEPACS_FORWARD_RULES": ";".join(r.key for r in s.forward_rules)},
                          data_dir=str(tmp_path))
    assert again.forward_rules == s.forward_rules


def test_forward_rule_matching():
    any_rule, ct1, ct_only = ForwardRule("HUB"), ForwardRule("HUB", "CT1"), ForwardRule("HUB", modality="CT")
    both = ForwardRule("HUB", "CT1", "CT")
    assert any_rule.matches(None, "")
    assert ct1.matches("CT1", "MR") and ct1.matches("CT1 ", "OT") and not ct1.matches("CT2", "CT")
    assert not ct1.matches(None, "CT")
    assert ct_only.matches("X", "CT") and not ct_only.matches("X", "MR")
    assert both.matches("CT1", "CT") and not both.matches("CT1", "MR") and not both.matches("MR1", "CT")


@pytest.mark.parametrize("env, message", [
    ({"TELEPACS_FORWARD_RULES": "NOWHERE:*"}, "names destination NOWHERE, which is not in [dicom.destinations]"),
    ({"TELEPACS_FORWARD_RULES": "HUB:caller=CT1"}, "'caller=CT1' in rule 'HUB:caller=CT1' is not"),
    ({"TELEPACS_FORWARD_RULES": "HUB:modality=C T"}, "modality must be a DICOM modality code"),
    ({"TELEPACS_FORWARD_RULES": "HUB:*", "TELEPACS_FORWARD_BATCH_SIZE": "500"}, "batch_size 1-128"),
    ({"TELEPACS_FORWARD_RULES": "HUB:*", "TELEPACS_FORWARD_RETRY_MAX": "1", "TELEPACS_FORWARD_RETRY_INITIAL": "5"},
     "forward retry_max must be at least 5.0"),
    ({"TELEPACS_FORWARD_RETRY_INITIAL": "soon"}, "forward retry_initial must be a number"),
])
def test_bad_forward_settings_are_named(tmp_path, env, message):
    with pytest.raises(ConfigError) as err:
        load_settings(env={"TELEPACS_MOVE_DESTINATIONS": "HUB=h:104", **env}, data_dir=str(tmp_path))
    assert message in str(err.value)


def test_forward_rule_tables_are_checked(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[dicom.destinations]\nHUB = \"h:104\"\n[[forward.rules]]\ndestination = \"HUB\"\nmodalty = \"CT\"\n")
    with pytest.raises(ConfigError, match="unknown setting in a forward rule: modalty"):
        load_settings(cfg, env={})


def test_public_url_and_render_cache(tmp_path):
    from archive.config import ConfigError, load_settings

    settings = load_settings(env={"TELEPACS_PUBLIC_URL": "https://pacs.bv-huyen.vn/", "TELEPACS_RENDER_CACHE_MB": "64"},
                             data_dir=str(tmp_path))
    assert settings.public_url == "https://pacs.bv-huyen.vn" and settings.render_cache_mb == 64
    with pytest.raises(ConfigError, match="public URL"):
        load_settings(env={"TELEPACS_PUBLIC_URL": "pacs.local"}, data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="render cache"):
        load_settings(env={"TELEPACS_RENDER_CACHE_MB": "-5"}, data_dir=str(tmp_path))
