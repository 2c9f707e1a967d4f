"""The ``telepacs`` command: wires settings, archive, DICOM node and web app together."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from archive import audit, people
from archive.config import ConfigError, Settings, load_settings
from archive.db import make_engine, upgrade_schema
from archive.forward_queue import DestinationStatus, ForwardQueue, QueueUnavailable
from archive.index import CatalogIndex, Source
from archive.models import AuditEntry
from archive import orthanc
from archive.service import Archive, IngestError, IngestOutcome, iter_dicom_paths
from storage import SpooledObjectStore, open_store
from telepacs.logs import setup_logging
from telepacs.supervise import Plan

log = logging.getLogger("telepacs")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_init(args: argparse.Namespace) -> int:
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_schema(make_engine(settings.db_url))
    print(f"index ready: {settings.db_url.split('@')[-1]}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the DICOM node workers and the web app under gunicorn until interrupted."""
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    upgrade_schema(engine)
    bootstrap_admin(engine, settings)
    if settings.forward_rules:
        # Before anything is received: a new rule forwards what arrives from now on.
        ForwardQueue(engine).ensure_cursors(settings.forward_rules)
    engine.dispose()
    if args.config:
        os.environ["TELEPACS_CONFIG"] = str(Path(args.config).resolve())
    os.environ.setdefault("TELEPACS_DATA_DIR", str(settings.data_dir))
    workers = settings.dicom_workers
    commands: list[list[str]] = []
    spooled = _uses_spool(settings)
    if spooled:
        # One uploader for the spool, at a lower CPU priority than the receivers:
        # a C-STORE is acknowledged once spooled; the upload can trail behind.
        commands.append([sys.executable, "-m", "telepacs.cli", "drain"])
    if settings.forward_rules:
        commands.append([sys.executable, "-m", "telepacs.cli", "forward", "run"])
    for _ in range(workers):
        commands.append([sys.executable, "-m", "dicom_node"] + (["--reuse-port"] if workers > 1 else [])
                        + (["--no-drain"] if spooled else []))
    listening = [(settings.dicom_host, settings.dicom_port)]
    if not args.no_web:
        commands.append([sys.executable, "-m", "gunicorn", "--bind", f"{settings.http_host}:{settings.http_port}",
                         "--workers", str(args.web_workers), "--worker-class", "gthread", "--threads", "8",
                         "--config", "python:viewer.gunicorn_conf", "--access-logfile", "-", "viewer:create_app()"])
        listening.append((settings.http_host, settings.http_port))
    banner = [f"telepacs: DICOM node {settings.ae_title} on {settings.dicom_host}:{settings.dicom_port} "
              f"({workers} receiving process{'es' if workers > 1 else ''})"]
    if not args.no_web:
        banner.append(f"telepacs: web on http://{settings.http_host}:{settings.http_port}/")
    if settings.forward_rules:
        banner.append(f"telepacs: forwarding: {'; '.join(rule.key for rule in settings.forward_rules)}")
    banner.append(f"telepacs: data in {settings.data_dir} (index {settings.db_url.split('@')[-1]}, "
                  f"storage {settings.storage_url.split('@')[-1]})")
    plan = Plan(commands=commands, listening=listening, banner=banner, log_level=settings.log_level)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the small supervisor (see telepacs.supervise): same PID, none of this process's imports.
    os.execv(sys.executable, [sys.executable, "-m", "telepacs.supervise", plan.to_json()])
    return 0  # not reached


def _uses_spool(settings: Settings) -> bool:
    store = open_store(settings.storage_url, spool_dir=settings.spool_dir, drain=False)
    try:
        return isinstance(store, SpooledObjectStore)
    finally:
        store.close()


def cmd_drain(args: argparse.Namespace) -> int:
    """Upload the receive spool to object storage until stopped (started by `serve`)."""
    settings = _settings(args)
    os.nice(args.nice)
    store = open_store(settings.storage_url, spool_dir=settings.spool_dir, drain=True, drain_idle_rescan=0.25)
    if not isinstance(store, SpooledObjectStore):
        print("telepacs drain: the storage has no spool (file storage, or s3 with spool=false)", file=sys.stderr)
        store.close()
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("draining spool %s to %s (%d waiting)", settings.spool_dir, store.description, store.pending_count())
    while not stop.wait(1.0):  # a timed wait: the main thread wakes to run the signal handler
        pass
    store.close()
    return 0


def cmd_forward_run(args: argparse.Namespace) -> int:
    """Send queued instances to their destinations until stopped (started by `serve` when rules exist)."""
    from dicom_node.forwarding import Forwarder

    settings = _settings(args)
    if not settings.forward_rules:
        print("telepacs forward run: no forward rules configured ([[forward.rules]] or TELEPACS_FORWARD_RULES)",
              file=sys.stderr)
        return 2
    archive = Archive.open(settings, drain_spool=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        Forwarder(archive, ForwardQueue(archive.index.engine)).run(stop)
    finally:
        archive.close()
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _status_rows(statuses: list[DestinationStatus], now: dt.datetime) -> list[list[str]]:
    rows = [["DESTINATION", "PENDING", "SENT", "FAILED", "OLDEST PENDING", "NEXT RETRY", "LAST ERROR"]]
    for st in statuses:
        oldest = None if st.oldest_pending is None else (now - st.oldest_pending).total_seconds()
        due = None if st.next_attempt is None else (st.next_attempt - now).total_seconds()
        rows.append([st.destination, str(st.pending), str(st.sent), str(st.failed), _age(oldest),
                     "-" if due is None else ("now" if due <= 0 else "in " + _age(due)), st.last_error or "-"])
    return rows


def cmd_forward_status(args: argparse.Namespace) -> int:
    """The forward queue per destination: pending, sent, failed, oldest pending, next retry, last error."""
    settings = _settings(args)
    engine = make_engine(settings.db_url)
    try:
        upgrade_schema(engine)
        statuses = ForwardQueue(engine).status()
    except QueueUnavailable as exc:
        print(f"telepacs forward status: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    now = dt.datetime.now(dt.timezone.utc)
    if args.json:
        print(json.dumps([st.as_json(now) for st in statuses], indent=2))
        return 0
    if not statuses:
        rules = "; ".join(rule.key for rule in settings.forward_rules) or "none"
        print(f"forward queue empty (rules: {rules})")
        return 0
    rows = _status_rows(statuses, now)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def cmd_forward_retry(args: argparse.Namespace) -> int:
    """Failed forwards (of one destination, or all) back to pending."""
    settings = _settings(args)
    engine = make_engine(settings.db_url)
    try:
        upgrade_schema(engine)
        count = ForwardQueue(engine).retry(args.destination)
    except QueueUnavailable as exc:
        print(f"telepacs forward retry: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"{count} failed instance(s) queued again{' for ' + args.destination if args.destination else ''}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    settings = _settings(args)
    archive = Archive.open(settings)
    source = Source("import", ae_title=None, host=None, facility=args.facility)
    sources = list(iter_dicom_paths([Path(p) for p in args.paths]))
    counts = {o.value: 0 for o in IngestOutcome} | {"failed": 0}
    try:
        with tqdm(total=len(sources), unit="file", desc="import", disable=args.quiet) as bar:
            for name, opener in sources:
                try:
                    with opener() as stream:
                        result = archive.ingest_stream(stream, source, name=name)
                    counts[result.outcome.value] += 1
                except IngestError as exc:
                    counts["failed"] += 1
                    tqdm.write(f"refused: {exc.message}", file=sys.stderr)
                except OSError as exc:
                    counts["failed"] += 1
                    tqdm.write(f"{name}: cannot read: {exc}", file=sys.stderr)
                bar.update(1)
    finally:
        archive.close()
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 1 if counts["failed"] else 0


def cmd_reindex(args: argparse.Namespace) -> int:
    archive = Archive.open(_settings(args))
    try:
        with tqdm(unit="object", desc="reindex", disable=args.quiet) as bar:
            counts = archive.reindex(progress=bar.update)
    finally:
        archive.close()
    print(f"indexed: {counts['indexed']}, skipped: {counts['skipped']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from viewer.consults.service import missing_attached_studies  # records kept 10 years: their studies too

    archive = Archive.open(_settings(args))
    try:
        total = archive.index.counts()["instances"]
        with tqdm(total=total, unit="instance", desc="verify", disable=args.quiet) as bar:
            report = archive.verify(progress=bar.update, checksums=not args.quick)
        with archive.index.session() as session:
            lost = missing_attached_studies(session)
    finally:
        archive.close()
    for consult_id, study_uid, attached, now in lost:
        print(f"CONSULT  consult {consult_id}: study {study_uid} had {attached} instances when attached, "
              f"{now} now in the catalogue")
    for key in report.missing:
        print(f"MISSING  {key}")
    for key in report.corrupt:
        print(f"CORRUPT  {key}")
    for key in report.orphaned:
        print(f"ORPHANED {key}")
    print(f"checked: {report.checked}, missing: {len(report.missing)}, corrupt: {len(report.corrupt)}, "
          f"orphaned: {len(report.orphaned)}, consult studies incomplete: {len(lost)}")
    return 0 if report.ok and not lost else 1


def cmd_orthanc(args: argparse.Namespace) -> int:
    """Pull studies from an Orthanc or push one to it (the logic is in archive.orthanc)."""
    try:
        target = orthanc.parse_target(args.url, args.user, args.password)
        since = orthanc.parse_since(args.since) if getattr(args, "since", None) else None
    except orthanc.OrthancError as exc:
        print(f"telepacs orthanc {args.action}: {exc}", file=sys.stderr)
        return 2
    try:
        api = orthanc.connect(target, timeout=args.timeout)
    except orthanc.OrthancError as exc:
        print(f"telepacs orthanc {args.action}: {exc}", file=sys.stderr)
        return 2
    archive = Archive.open(_settings(args))
    try:
        if args.action == "pull":
            pulled = orthanc.plan_pull(api, orthanc.Selection(args.study, args.patient, since))
            report = _with_bar(len(pulled), "pull", args.quiet,
                               lambda progress: orthanc.pull(archive, api, pulled, progress))
        else:
            pushed = orthanc.plan_push(archive, args.study)
            report = _with_bar(len(pushed), "push", args.quiet,
                               lambda progress: orthanc.push(archive, api, pushed, progress))
    except orthanc.OrthancError as exc:
        print(f"telepacs orthanc {args.action}: {exc}", file=sys.stderr)
        return 2
    finally:
        api.close()
        archive.close()
    for uid, reason in report.failed:
        print(f"FAILED {uid}: {reason}", file=sys.stderr)
    if report.aborted:
        print(f"stopped: {report.aborted} (run the same command again to resume)", file=sys.stderr)
    print(report.summary("stored" if args.action == "pull" else "sent"))
    return 0 if report.ok else 1


def _with_bar(total: int, what: str, quiet: bool,
              run: Callable[[orthanc.Progress], orthanc.SyncReport]) -> orthanc.SyncReport:
    """Run a pull or push under a progress bar over its instances (megabytes moved as a postfix)."""
    moved = 0
    with tqdm(total=total, unit="instance", desc=what, disable=quiet) as bar:
        def progress(instances: int, nbytes: int) -> None:
            nonlocal moved
            moved += nbytes
            if instances:
                bar.set_postfix_str(f"{moved / 1e6:.1f} MB", refresh=False)
                bar.update(instances)
        return run(progress)


# -- people: users, facilities, tokens, audit ------------------------------------------------

INITIAL_PASSWORD_FILE = "initial-admin-password"


def bootstrap_admin(engine: Engine, settings: Settings) -> str | None:
    """On a fresh install (no user at all): facility LOCAL and an ``admin`` with a random password.

    The password is printed once and written to ``DATA_DIR/initial-admin-password`` (mode 0600);
    returns it, or None when users exist already.
    """
    index = CatalogIndex(engine)
    with index.write_session() as session, session.begin():
        if people.count_users(session):
            return None
        try:
            people.get_facility(session, "LOCAL")
        except people.NotFound:
            people.create_facility(session, code="LOCAL", name="Local facility", tier=settings.local_tier,
                                   actor="bootstrap")
        password = secrets.token_urlsafe(15)
        people.create_user(session, username="admin", password=password, role=people.Role.ADMIN,
                           facility_code="LOCAL", display_name="Administrator", actor="bootstrap")
    path = settings.data_dir / INITIAL_PASSWORD_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    print("telepacs: first start: created facility LOCAL and user 'admin' with password\n"
          f"    {password}\n"
          f"  (also in {path}, readable by this account only). Log in and change it at /account/password; "
          "add users with `telepacs user add`.", flush=True)
    return password


def _read_new_password(args: argparse.Namespace) -> str | None:
    """The new password from stdin (--password-stdin), twice at a terminal, or generated (--random-password)."""
    if getattr(args, "random_password", False):
        password = secrets.token_urlsafe(15)
        print(f"password: {password}")
        return password
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if first != getpass.getpass("Again: "):
        print("the two passwords differ", file=sys.stderr)
        return None
    return first


def _people(args: argparse.Namespace, what: str, action: Callable[[Session], str]) -> int:
    """Run ``action`` in one write transaction of the index; print its result or the refusal."""
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    try:
        upgrade_schema(engine)
        index = CatalogIndex(engine)
        with index.write_session() as session, session.begin():
            message = action(session)
    except people.PeopleError as exc:
        print(f"telepacs {what}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if message:
        print(message)
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    password = _read_new_password(args)
    if password is None:
        return 1

    def add(session: Session) -> str:
        user = people.create_user(session, username=args.username, password=password, role=args.role,
                                  facility_code=args.facility, display_name=args.name or "", email=args.email or "",
                                  specialty=args.specialty or "", certificate_number=args.certificate or "",
                                  certificate_scope=args.certificate_scope or "", actor=_cli_actor())
        return f"user {user.username} ({user.role}) added to facility {args.facility.upper()}"
    return _people(args, "user add", add)


def cmd_user_passwd(args: argparse.Namespace) -> int:
    password = _read_new_password(args)
    if password is None:
        return 1

    def passwd(session: Session) -> str:
        user = people.set_password(session, args.username, password, actor=_cli_actor())
        return f"password of {user.username} changed; their sessions are ended and any lockout lifted"
    return _people(args, "user passwd", passwd)


def cmd_user_disable(args: argparse.Namespace) -> int:
    def disable(session: Session) -> str:
        user = people.set_disabled(session, args.username, not args.enable, actor=_cli_actor())
        return f"user {user.username} {'enabled' if args.enable else 'disabled (sessions ended, tokens revoked)'}"
    return _people(args, "user disable", disable)


def cmd_user_list(args: argparse.Namespace) -> int:
    def listing(session: Session) -> str:
        rows = [["USERNAME", "ROLE", "FACILITY", "STATE", "NAME"]]
        now = dt.datetime.now(dt.timezone.utc)
        for user in people.list_users(session):
            locked = user.locked_until
            if locked is not None and locked.tzinfo is None:
                locked = locked.replace(tzinfo=dt.timezone.utc)
            state = "disabled" if user.disabled else ("locked" if locked is not None and locked > now else "active")
            rows.append([user.username, user.role, user.facility.code, state, user.display_name])
        return _table(rows)
    return _people(args, "user list", listing)


def cmd_facility_add(args: argparse.Namespace) -> int:
    def add(session: Session) -> str:
        facility = people.create_facility(session, code=args.code, name=args.name or "", tier=args.tier,
                                          actor=_cli_actor())
        for title in args.ae or []:
            people.add_ae_title(session, facility_code=facility.code, ae_title=title, actor=_cli_actor())
        titles = f" with AE title(s) {', '.join(args.ae)}" if args.ae else ""
        return f"facility {facility.code} ({facility.tier}) added{titles}"
    return _people(args, "facility add", add)


def cmd_facility_ae(args: argparse.Namespace) -> int:
    def add(session: Session) -> str:
        for title in args.ae:
            people.add_ae_title(session, facility_code=args.code, ae_title=title, actor=_cli_actor())
        return f"AE title(s) {', '.join(args.ae)} now belong to facility {args.code.upper()}"
    return _people(args, "facility ae", add)


def cmd_facility_list(args: argparse.Namespace) -> int:
    def listing(session: Session) -> str:
        rows = [["CODE", "TIER", "AE TITLES", "NAME"]]
        for facility in people.list_facilities(session):
            rows.append([facility.code, facility.tier, ",".join(sorted(a.ae_title for a in facility.ae_titles)) or "-",
                         facility.name])
        return _table(rows)
    return _people(args, "facility list", listing)


def cmd_token_create(args: argparse.Namespace) -> int:
    def create(session: Session) -> str:
        token, secret = people.create_token(session, args.username, args.name or "", actor=_cli_actor())
        return (f"token {token.id} for {args.username.lower()}: {secret}\n"
                "(shown once; send it as 'Authorization: Bearer <token>')")
    return _people(args, "token create", create)


def cmd_token_revoke(args: argparse.Namespace) -> int:
    def revoke(session: Session) -> str:
        token = people.revoke_token(session, args.id, actor=_cli_actor())
        return f"token {token.id} revoked"
    return _people(args, "token revoke", revoke)


def cmd_token_list(args: argparse.Namespace) -> int:
    def listing(session: Session) -> str:
        rows = [["ID", "USER", "STATE", "CREATED", "LAST USED", "NAME"]]
        for token, username in people.list_tokens(session, args.username):
            rows.append([str(token.id), username, "revoked" if token.revoked_at else "active",
                         _when(token.created_at), _when(token.last_used_at), token.name])
        return _table(rows)
    return _people(args, "token list", listing)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = make_engine(settings.db_url)
    try:
        upgrade_schema(engine)
        with CatalogIndex(engine).session() as session:
            result = audit.verify(session)
            head = session.execute(select(AuditEntry.id, AuditEntry.entry_hash)
                                   .order_by(AuditEntry.id.desc()).limit(1)).first()
    finally:
        engine.dispose()
    if result.ok:
        print(f"audit chain intact: {result.entries} entries verified")
        if head is not None:
            # Keep this line somewhere else (a notebook, an e-mail): removing entries from the end of
            # the log leaves an intact but shorter chain, which only an outside copy of the head reveals.
            print(f"head: entry {head[0]} {head[1]}")
        return 0
    print(f"AUDIT CHAIN BROKEN at entry {result.first_bad_id}: {result.reason} "
          f"({result.entries} entries before it verified)")
    return 1


def _cli_actor() -> str:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    return f"cli:{who}"


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def _add_people_commands(sub: Any) -> None:
    p = sub.add_parser("user", help="people who log in: add, passwd, disable, list")
    users = p.add_subparsers(dest="user_command", required=True)
    q = users.add_parser("add", help="add a user to a facility (password from stdin or asked twice)")
    q.add_argument("username")
    q.add_argument("--facility", required=True, help="facility code, e.g. BV-HUYEN-A")
    q.add_argument("--role", required=True, choices=[r.value for r in people.Role])
    q.add_argument("--name", help="display name, e.g. 'BS. Nguyễn Văn A'")
    q.add_argument("--email")
    q.add_argument("--specialty", help="e.g. radiology (specialists)")
    q.add_argument("--certificate", help="practising certificate number (specialists)")
    q.add_argument("--certificate-scope", help="scope of practice on the certificate")
    q.set_defaults(func=cmd_user_add)
    r = users.add_parser("passwd", help="set a user's password (ends their sessions, lifts a lockout)")
    r.add_argument("username")
    r.set_defaults(func=cmd_user_passwd)
    for cmd in (q, r):
        how = cmd.add_mutually_exclusive_group()
        how.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
        how.add_argument("--random-password", action="store_true", help="generate one and print it")
    q = users.add_parser("disable", help="disable a user (ends sessions, revokes tokens); --enable to undo")
    q.add_argument("username")
    q.add_argument("--enable", action="store_true")
    q.set_defaults(func=cmd_user_disable)
    q = users.add_parser("list", help="every user with role, facility and state")
    q.set_defaults(func=cmd_user_list)

    p = sub.add_parser("facility", help="facilities and their DICOM AE titles: add, ae, list")
    facilities = p.add_subparsers(dest="facility_command", required=True)
    q = facilities.add_parser("add", help="add a facility")
    q.add_argument("code", help="what studies of this facility carry, e.g. BV-HUYEN-A")
    q.add_argument("--name")
    q.add_argument("--tier", default=people.Tier.DISTRICT.value, choices=[t.value for t in people.Tier])
    q.add_argument("--ae", action="append", metavar="AE_TITLE", help="an AE title of its modalities (repeatable)")
    q.set_defaults(func=cmd_facility_add)
    q = facilities.add_parser("ae", help="declare more AE titles of an existing facility")
    q.add_argument("code")
    q.add_argument("ae", nargs="+", metavar="AE_TITLE")
    q.set_defaults(func=cmd_facility_ae)
    q = facilities.add_parser("list", help="every facility with tier and AE titles")
    q.set_defaults(func=cmd_facility_list)

    p = sub.add_parser("token", help="API tokens for DICOMweb clients: create, revoke, list")
    tokens = p.add_subparsers(dest="token_command", required=True)
    q = tokens.add_parser("create", help="a new token acting as a user (printed once)")
    q.add_argument("username")
    q.add_argument("--name", help="what it is for, e.g. 'workstation 3'")
    q.set_defaults(func=cmd_token_create)
    q = tokens.add_parser("revoke", help="revoke a token by its id")
    q.add_argument("id", type=int)
    q.set_defaults(func=cmd_token_revoke)
    q = tokens.add_parser("list", help="tokens (never their secret)")
    q.add_argument("--user", dest="username")
    q.set_defaults(func=cmd_token_list)

    p = sub.add_parser("audit", help="the audit log")
    audits = p.add_subparsers(dest="audit_command", required=True)
    q = audits.add_parser("verify", help="check the hash chain; exit 1 and name the first broken entry")
    q.set_defaults(func=cmd_audit_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telepacs", description="PACS archive and teleradiology viewer")
    parser.add_argument("--config", help="TOML settings file (default: $TELEPACS_CONFIG or DATA_DIR/telepacs.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the DICOM node and the web app")
    p.add_argument("--no-web", action="store_true", help="only the DICOM node")
    p.add_argument("--web-workers", type=int, default=2)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("drain", help="upload the receive spool to S3 until stopped (serve runs it)")
    p.add_argument("--nice", type=int, default=10, help="lower CPU priority by this much")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("forward", help="the forward queue: run the sender, show status, retry failures")
    forward = p.add_subparsers(dest="forward_command", required=True)
    q = forward.add_parser("run", help="send queued instances to their destinations until stopped (serve runs it)")
    q.set_defaults(func=cmd_forward_run)
    q = forward.add_parser("status", help="pending, sent and failed instances per destination")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_forward_status)
    q = forward.add_parser("retry", help="queue failed instances again")
    q.add_argument("--destination", help="only this destination AE title")
    q.set_defaults(func=cmd_forward_retry)

    p = sub.add_parser("init", help="create or upgrade the index schema")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("import", help="ingest DICOM files, folders and zip archives")
    p.add_argument("paths", nargs="+")
    p.add_argument("--facility", help="facility code recorded on the imported instances")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("reindex", help="rebuild the whole index from storage")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("verify", help="check every indexed object exists with its checksum; list orphans")
    p.add_argument("--quick", action="store_true", help="existence only, no checksums")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("orthanc", help="pull studies from an Orthanc, or push one to it (REST API)")
    actions = p.add_subparsers(dest="action", required=True)
    pull = actions.add_parser("pull", help="import studies from an Orthanc through the normal ingest path")
    pull.add_argument("url", help="Orthanc REST URL, e.g. http://user:password@orthanc.example:8042/")
    which = pull.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="UID", help="only this StudyInstanceUID")
    which.add_argument("--patient", metavar="ID", help="only the studies of this PatientID")
    which.add_argument("--since", metavar="DATE", help="only studies with StudyDate on or after DATE (YYYYMMDD)")
    push = actions.add_parser("push", help="send one study to an Orthanc")
    push.add_argument("url", help="Orthanc REST URL, e.g. http://user:password@orthanc.example:8042/")
    push.add_argument("--study", metavar="UID", required=True, help="the StudyInstanceUID to send")
    for action in (pull, push):
        action.add_argument("--user", help="Orthanc user (instead of user:password@ in the URL)")
        action.add_argument("--password", default=os.environ.get("TELEPACS_ORTHANC_PASSWORD"),
                            help="Orthanc password (default: $TELEPACS_ORTHANC_PASSWORD)")
        action.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each HTTP answer")
        action.add_argument("--quiet", action="store_true")
        action.set_defaults(func=cmd_orthanc)
    _add_people_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"telepacs: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
