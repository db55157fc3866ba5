"""``omis bundle`` (keygen, sign, verify) and ``omis ota`` (trust, install, status, rollback,
publish).  Thin: parse, call :mod:`deploy.ota`, print.  See ``docs/ota.md``."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference.state_dir import resolve_state_dir

Handler = Callable[[argparse.Namespace], int]


def _state_dir(args: argparse.Namespace) -> Path:
    return resolve_state_dir(args.state_dir)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    # Results go to stdout (logs go to stderr); sys.stdout.write keeps library lint rules intact.
    out = (
        json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
        if getattr(args, "json", False)
        else text
    )
    sys.stdout.write(out + "\n")


# -- omis bundle ----------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from deploy.ota.signing import generate_keypair

    pair = generate_keypair(Path(args.out), args.name)
    fp = pair.fingerprint
    data = {"private": str(pair.private), "public": str(pair.public), "fingerprint": fp}
    _emit(args, data, f"{pair.private}\n{pair.public}\nfingerprint {pair.fingerprint}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from deploy.ota.signing import sign_bundle

    fp = sign_bundle(Path(args.bundle), Path(args.key))
    _emit(args, {"bundle": args.bundle, "signer": fp}, f"signed {args.bundle} (key {fp})")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from deploy.ota.signing import pack_dir

    info = pack_dir(Path(args.bundle), Path(args.out))
    unsigned = "" if info["signed"] else " (unsigned: run 'omis bundle sign' on it)"
    _emit(args, info, f"packed {info['name']} v{info['version']} into {args.out}{unsigned}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from deploy.ota.signing import fingerprint, load_public_key, verify_bundle

    keys = {}
    for path in args.pubkey:
        key = load_public_key(Path(path))
        keys[fingerprint(key)] = key
    info = verify_bundle(Path(args.bundle), keys)
    _emit(args, info, f"OK {info['name']} v{info['version']} sha256 {info['sha256']}")
    return 0


# -- omis ota -------------------------------------------------------------------------------------


def _trust(args: argparse.Namespace) -> int:
    from deploy.ota.trust import TrustStore

    store = TrustStore(_state_dir(args))
    if args.remove:
        fp = store.remove(args.remove)
        _emit(args, {"removed": fp}, f"removed {fp}")
    elif args.key:
        fp = store.add(Path(args.key))
        _emit(args, {"trusted": fp}, f"trusted {fp}")
    if args.list or not (args.key or args.remove):
        fps = sorted(store.keys())  # loads and checks every key: a tampered file is an error
        _emit(args, {"keys": fps}, "\n".join(fps) if fps else "(no trusted keys)")
    return 0


def _installer(args: argparse.Namespace) -> Any:
    from deploy.ota import GoldenGate, Installer, ModelStore, ServiceHooks, TrustStore
    from deploy.ota.gate import store_checks

    state_dir = _state_dir(args)
    store = ModelStore(state_dir)
    gate = GoldenGate(backend=getattr(args, "backend", "auto"), state_dir=state_dir)
    hooks = ServiceHooks(checks=store_checks(store, gate))
    return Installer(store, TrustStore(state_dir), gate, hooks)


def _install(args: argparse.Namespace) -> int:
    from deploy.ota import HealthPolicy, InstallOptions

    policy = HealthPolicy(slides=0, seconds=args.health_seconds, check_interval_s=args.interval)
    opts = InstallOptions(allow_downgrade=args.allow_downgrade, health=policy)
    result = _installer(args).install(Path(args.bundle), opts)
    m = result.model
    _emit(args, result.to_dict(), f"committed {m['name']} v{m['version']} sha256 {m['sha256']}")
    return 0


def _status_text(st: dict[str, Any]) -> str:
    lines = []
    for role in ("current", "previous", "pending"):
        m = st["models"][role]
        desc = f"v{m['version']} {m['name']} sha256 {m['sha256']}" if m else "-"
        lines.append(f"{role:9} {desc}")
    last = st["last_outcome"]
    if last:
        lines.append(f"last      {last['result']} v{last['version']} {last['reason']}".rstrip())
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    from deploy.ota import ModelStore

    st = ModelStore(_state_dir(args)).state()
    _emit(args, st, _status_text(st))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    installer = _installer(args)
    with installer.store.lock():
        # A pending model left by a crash is rolled back by recovery; do not go back twice.
        if installer.store.recover() != "rolled_back":
            installer.rollback(args.reason)
    st = installer.store.state()
    _emit(args, st, _status_text(st))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from deploy.broker import parse_broker_url
    from deploy.ota.delivery import PathSource, UrlSource, inline_source, make_offer
    from deploy.ota.exceptions import DeliveryError
    from deploy.ota.sender import PRESENCE_S, OfferSender, final_outcome, reply_reason
    from deploy.ota.signing import opened
    from deploy.ota.unpack import is_archive
    from inference.bundle import sha256_file

    bundle = Path(args.bundle)
    cid = secrets.token_hex(8)
    archive: Path | None = None
    if args.url:
        if not is_archive(bundle):
            raise DeliveryError("--url needs the .tar that the URL serves")
        src: Any = UrlSource(url=args.url, size=bundle.stat().st_size, sha256=sha256_file(bundle))
    elif args.path:
        src = PathSource(path=args.path)
    else:
        if not is_archive(bundle):
            raise DeliveryError("--inline needs a .tar bundle (omis bundle sign works on both)")
        archive = bundle
        src = inline_source(bundle, secrets.token_hex(8), args.chunk_kib * 1024)
    with opened(bundle):
        offer = make_offer(bundle, src, cid)
    deadline = time.monotonic() + args.wait
    with OfferSender(parse_broker_url(args.broker), args.prefix, args.device_id) as sender:
        sender.connect()
        sender.check_present(min(PRESENCE_S, args.answer_timeout, args.wait))
        reply = sender.deliver(offer, archive, args.wait, args.answer_timeout)
        if not reply.ok:
            out = {"outcome": "rejected", "reason": reply_reason(reply), "reply": reply.to_json()}
            _emit(args, out, json.dumps(out, allow_nan=False))
            return 1
        state = sender.outcome(offer, max(0.0, deadline - time.monotonic()))
    out = {**final_outcome(state, cid), "reply": reply.to_json(), "state": state.to_json()}
    _emit(args, out, json.dumps(out, allow_nan=False))  # JSON either way, as it always was
    return 0 if out["outcome"] == "committed" else 1


def _leaf(
    sub: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    name: str,
    handler: Handler,
    text: str,
    *,
    json_flag: bool = True,
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=text, description=text)
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(handler=handler)
    return p


def _register_bundle(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bundle",
        help="model bundle keys, signatures (Ed25519) and archives",
        description="Model bundle keys and signatures: keygen, sign, verify (Ed25519); pack a "
        "bundle directory into the .tar that 'omis ota install' and 'omis ota publish' take.",
    )
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    k = _leaf(bsub, common, "keygen", _keygen, "write a private key (0600) and NAME.pub")
    k.add_argument("--out", required=True, help="directory for the key pair")
    k.add_argument("--name", default="omis-bundle", help="file name of the private key")
    s = _leaf(bsub, common, "sign", _sign, "write manifest.sig into a bundle (directory or .tar)")
    s.add_argument("bundle", help="bundle directory or .tar")
    s.add_argument("--key", required=True, help="private key file")
    pk = _leaf(bsub, common, "pack", _pack, "write a bundle directory as a .tar (atomically)")
    pk.add_argument("bundle", help="bundle directory (its manifest must match its files)")
    pk.add_argument("out", help="the .tar to write (replaced atomically)")
    v = _leaf(bsub, common, "verify", _verify, "verify a bundle's signature and every file hash")
    v.add_argument("bundle", help="bundle directory or .tar")
    v.add_argument("--pubkey", required=True, action="append", help="public key (repeatable)")


def _register_ota(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "ota",
        help="model updates: trust, install, status, rollback, publish",
        description="Model updates on this device's trust store and model store (trust, install, "
        "status, rollback), and offering a bundle to a device over MQTT (publish).",
    )
    osub = p.add_subparsers(dest="ota_command", metavar="ACTION", required=True)
    t = _leaf(osub, common, "trust", _trust, "trust a public key, or list/remove trusted keys")
    t.add_argument("key", nargs="?", help="public key (.pub) to trust")
    t.add_argument("--remove", metavar="FINGERPRINT", help="stop trusting a key (8+ hex digits)")
    t.add_argument("--list", action="store_true", help="list trusted fingerprints")
    i = _leaf(osub, common, "install", _install, "verify, gate, switch to and commit a bundle")
    i.add_argument("bundle", help="bundle directory or .tar")
    i.add_argument("--allow-downgrade", action="store_true", help="local operator override")
    i.add_argument("--backend", default="auto", help="backend of the golden gate")
    i.add_argument("--health-seconds", type=float, default=0.0, help="health period length")
    i.add_argument("--interval", type=float, default=5.0, help="seconds between health checks")
    _leaf(osub, common, "status", _status, "current, previous and pending models; last outcome")
    r = _leaf(osub, common, "rollback", _rollback, "go back to the previous model")
    r.add_argument("--reason", default="operator request", help="recorded in the outcome")
    pub = _leaf(osub, common, "publish", _publish, "offer a bundle to a device over MQTT")
    pub.add_argument("bundle", help="signed bundle (.tar for --inline and --url)")
    pub.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    pub.add_argument("--device-id", required=True, help="target device id")
    pub.add_argument("--prefix", default="omis/v1", help="topic prefix")
    how = pub.add_mutually_exclusive_group()
    how.add_argument("--inline", action="store_true", help="send the .tar in chunks (default)")
    how.add_argument("--url", help="HTTPS URL the device downloads the .tar from")
    how.add_argument("--path", help="path of the bundle on the device")
    pub.add_argument("--chunk-kib", type=int, default=256, help="chunk size for --inline")
    pub.add_argument(
        "--answer-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the device to be present and to take the offer before "
        "anything (more) is sent; a device that does not answer fails within this",
    )
    pub.add_argument(
        "--wait",
        type=float,
        default=900.0,
        help="seconds to wait for the final outcome (committed, rolled back, rejected); "
        "exits 0 only when committed",
    )
    _register_shadow(osub, common)


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add ``omis bundle`` and ``omis ota``."""
    _register_bundle(sub, common)
    _register_ota(sub, common)


# -- omis ota shadow ----------------------------------------------------------------------------


def _shadow_gate(args: argparse.Namespace) -> Any:
    """The shadow gate of a local install: the serving model's spectrum, then the golden gate."""
    from deploy.ota import GoldenGate, ModelStore
    from deploy.ota.exceptions import RejectedError
    from deploy.ota.shadow import check_same_spectrum
    from inference.bundle import Bundle
    from inference.spectrum import parse_params

    state_dir = _state_dir(args)
    gate = GoldenGate(backend=args.backend, state_dir=state_dir)

    def check(bundle: Bundle) -> None:
        serving = ModelStore(state_dir).active()
        if serving is None:
            raise RejectedError("a shadow candidate needs a serving model to run beside")
        m = serving.manifest
        check_same_spectrum(bundle.manifest, parse_params(m.spectrum), f"{m.name} v{m.version}")
        gate(bundle)

    return check


def _shadow_install(args: argparse.Namespace) -> int:
    from deploy.ota import Installer, InstallOptions, ModelStore, TrustStore
    from deploy.ota.shadow import ShadowStore, install_shadow

    state_dir = _state_dir(args)
    installer = Installer(ModelStore(state_dir), TrustStore(state_dir), _shadow_gate(args))
    slot = install_shadow(installer, ShadowStore(state_dir), Path(args.bundle), InstallOptions())
    _emit(args, slot.describe(), f"shadow {slot.name} v{slot.version} sha256 {slot.sha256}")
    return 0


def _shadow_status(args: argparse.Namespace) -> int:
    from deploy.ota.shadow import ShadowStore

    held = ShadowStore(_state_dir(args)).describe()
    text = "no shadow candidate" if held is None else f"shadow {held['name']} v{held['version']}"
    _emit(args, {"shadow": held}, text if held is None else f"{text} sha256 {held['sha256']}")
    return 0


def _shadow_clear(args: argparse.Namespace) -> int:
    from deploy.ota import ModelStore
    from deploy.ota.shadow import ShadowStore

    state_dir = _state_dir(args)
    with ModelStore(state_dir).lock():
        old = ShadowStore(state_dir).clear()
    text = "no shadow candidate" if old is None else f"cleared {old.name} v{old.version}"
    _emit(args, {"cleared": None if old is None else old.describe()}, text)
    return 0


def _shadow_promote(args: argparse.Namespace) -> int:
    from deploy.ota import HealthPolicy, InstallOptions
    from deploy.ota.exceptions import RejectedError
    from deploy.ota.shadow import ShadowStore

    shadow = ShadowStore(_state_dir(args))
    slot = shadow.read()
    if slot is None:
        raise RejectedError("no shadow candidate to promote")
    policy = HealthPolicy(slides=0, seconds=args.health_seconds, check_interval_s=args.interval)
    result = _installer(args).install(shadow.bundle_path(slot), InstallOptions(health=policy))
    shadow.clear()  # it serves now
    m = result.model
    _emit(args, result.to_dict(), f"committed {m['name']} v{m['version']} sha256 {m['sha256']}")
    return 0


def _register_shadow(
    osub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    p = osub.add_parser(
        "shadow",
        help="a candidate held beside the serving model: install, status, clear, promote",
        description="Shadow mode: the candidate passes the golden gate, must use the serving "
        "bundle's spectrum parameters, and classifies every slide's spectrum beside the serving "
        "model (omis.shadow/1 on .../shadow); promote installs it through the normal path.",
    )
    ssub = p.add_subparsers(dest="shadow_command", metavar="ACTION", required=True)
    i = _leaf(ssub, common, "install", _shadow_install, "verify, gate and hold a shadow candidate")
    i.add_argument("bundle", help="bundle directory or .tar")
    i.add_argument("--backend", default="auto", help="backend of the golden gate")
    _leaf(ssub, common, "status", _shadow_status, "the shadow candidate held (or none)")
    _leaf(ssub, common, "clear", _shadow_clear, "drop the shadow candidate")
    pr = _leaf(ssub, common, "promote", _shadow_promote, "install the shadow candidate as serving")
    pr.add_argument("--backend", default="auto", help="backend of the golden gate")
    pr.add_argument("--health-seconds", type=float, default=0.0, help="health period length")
    pr.add_argument("--interval", type=float, default=5.0, help="seconds between health checks")
