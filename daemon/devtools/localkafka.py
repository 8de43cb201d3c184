"""A real, private Apache Kafka broker for tests, the demo and benchmarks.

The daemon's guarantees (transactions, read_committed, rebalances, a broker
going away mid-stream) only mean something against a real broker, and mocks
of the Kafka protocol drift. This module fetches Kafka's jars once with Maven
into a cache outside the work tree and runs a single-node KRaft broker bound to
127.0.0.1 on free ports, so parallel runs and other local Kafkas never collide.

CLI: ``python -m daemon.devtools.localkafka fetch`` downloads the jars only;
``python -m daemon.devtools.localkafka run`` starts a broker, prints its bootstrap
address and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from daemon.errors import LstmdError

# The broker the whole test suite, demo and benchmarks run against; bump it
# deliberately. Kafka 4.x is KRaft-only (no ZooKeeper) and needs Java 17+.
# LOCALKAFKA_VERSION picks another 4.x release (e.g. the newest) for a run of the
# real-broker suite against it; each version has its own cache directory.
KAFKA_VERSION = os.environ.get("LOCALKAFKA_VERSION") or "4.1.1"
SCALA_VERSION = "2.13"
# Kafka 4 logs through log4j2; these bind SLF4J to it in the broker's classpath.
LOG4J_VERSION = "2.24.3"

KAFKA_JAR = f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
HEAP = "-Xmx512m"

# Maven resolves Kafka's whole runtime classpath (46 jars) from this one pom.
POM = f"""\
<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>lstmd</groupId><artifactId>kafka-broker</artifactId><version>1</version>
<packaging>pom</packaging>
<dependencies>
 <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{SCALA_VERSION}</artifactId>
  <version>{KAFKA_VERSION}</version></dependency>
 <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
  <version>{LOG4J_VERSION}</version></dependency>
 <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
  <version>{LOG4J_VERSION}</version></dependency>
</dependencies></project>
"""

# Console only: the broker's stdout goes to one log file we own, not to
# kafka.logs.dir files that nobody reads and that outlive the data dir.
LOG4J2_PROPERTIES = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.zk.name = org.apache.zookeeper
logger.zk.level = WARN
"""

# Single node: every internal topic has one replica; few partitions keep the
# first group/transaction coordinator load fast; no rebalance delay keeps tests quick.
BASE_PROPERTIES: dict[str, str] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "share.coordinator.state.topic.num.partitions": "1",
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "1000",
    # After a SIGKILL the controller refuses the restarted broker until the old
    # incarnation's session expires: 9 s by default, ~3 s with these.
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
    "num.partitions": "1",
    "auto.create.topics.enable": "false",
}

TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code

log = logging.getLogger(__name__)


class LocalKafkaError(LstmdError):
    """The local broker cannot be fetched, formatted, started or used."""


def cache_dir() -> Path:
    """Where the jars live: outside the work tree so `git clean` never refetches them."""
    env = os.environ.get("LOCALKAFKA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lstmd" / f"kafka-{KAFKA_VERSION}"


def _require(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise LocalKafkaError(f"`{tool}` is not on PATH; it is needed {why}")
    return path


def _jars_complete(libs: Path) -> bool:
    """True if libs holds a Kafka jar with the broker and the storage tool in it."""
    jar = libs / KAFKA_JAR
    if not jar.is_file():
        return False
    try:
        with zipfile.ZipFile(jar) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return {"kafka/Kafka.class", "kafka/tools/StorageTool.class"} <= names


def ensure_jars() -> Path:
    """Return the directory of Kafka's runtime jars, downloading them once with Maven.

    Maven writes into a fresh temp dir that is renamed into place only after
    the jars check out, so an interrupted download is never mistaken for a
    complete one.
    """
    root = cache_dir()
    libs = root / "libs"
    if _jars_complete(libs):
        return libs
    mvn = _require("mvn", "once, to download Kafka's jars")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        (tmp / "pom.xml").write_text(POM)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(tmp / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp / 'libs'}",
        ]
        log.info("downloading Kafka %s jars into %s", KAFKA_VERSION, root)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LocalKafkaError(
                f"mvn failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
            )
        if not _jars_complete(tmp / "libs"):
            raise LocalKafkaError(f"mvn finished but {KAFKA_JAR} is missing or incomplete")
        try:
            (tmp / "libs").rename(libs)
        except OSError:  # libs exists: a concurrent download won, or it is damaged
            if not _jars_complete(libs):
                shutil.rmtree(libs)
                (tmp / "libs").rename(libs)
        with contextlib.suppress(OSError):
            (tmp / "pom.xml").replace(root / "pom.xml")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return libs


def random_cluster_id() -> str:
    """A Kafka cluster id, made here to save `StorageTool random-uuid` a JVM start.

    Kafka's Uuid prints as 22 chars of unpadded url-safe base64 of 16 bytes;
    like Uuid.randomUuid() we reject ids starting with '-' (they read as CLI flags).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all sockets stay bound until all are chosen."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def _kill_pid(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer, run when a running LocalKafka is garbage-collected or, failing
    that, at interpreter exit, so a crashed test run leaves no JVM behind.
    It must reference only the process, never the LocalKafka."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


class LocalKafka:
    """A single-node KRaft Kafka (combined broker and controller) on 127.0.0.1.

    Ports are chosen once and kept across restart(), as is the data dir, so a
    restart looks to clients like the same broker coming back. `listeners`
    adds listeners ({name: security protocol}) on their own free ports and
    `properties` overrides or adds server.properties entries: together they
    let a test add, say, a SASL_SSL listener.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        port: int = 0,
        controller_port: int = 0,
        listeners: Mapping[str, str] | None = None,
        properties: Mapping[str, str] | None = None,
        heap: str = HEAP,
        scram_users: Mapping[str, str] | None = None,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="lstmd-kafka-")) if data_dir is None else Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        extra = dict(listeners or {})
        picked = iter(_free_ports(2 + len(extra)))
        self.port = port or next(picked)
        self.controller_port = controller_port or next(picked)
        self.listener_ports: dict[str, int] = {
            "PLAINTEXT": self.port,
            "CONTROLLER": self.controller_port,
            **{name: next(picked) for name in extra},
        }
        protocols = {"PLAINTEXT": "PLAINTEXT", "CONTROLLER": "PLAINTEXT", **extra}
        public = [name for name in self.listener_ports if name != "CONTROLLER"]
        self.properties: dict[str, str] = {
            **BASE_PROPERTIES,
            "controller.quorum.bootstrap.servers": f"{HOST}:{self.controller_port}",
            "listeners": ",".join(f"{n}://{HOST}:{p}" for n, p in self.listener_ports.items()),
            "advertised.listeners": ",".join(f"{n}://{HOST}:{self.listener_ports[n]}" for n in public),
            "listener.security.protocol.map": ",".join(f"{n}:{p}" for n, p in protocols.items()),
            "log.dirs": str(self.data_dir / "kraft-logs"),
            **(properties or {}),
        }
        self.heap = heap
        # {user: password}: SCRAM credentials written into the metadata log at format time.
        self.scram_users: dict[str, str] = dict(scram_users or {})
        self.log_path = self.data_dir / "broker.log"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._libs: Path | None = None

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT bootstrap address, e.g. "127.0.0.1:40123"."""
        return f"{HOST}:{self.port}"

    def address(self, listener: str) -> str:
        """host:port of a named listener (for the extra listeners)."""
        return f"{HOST}:{self.listener_ports[listener]}"

    @property
    def pid(self) -> int | None:
        """The broker JVM's PID while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _java(self, main: str, *args: str, jvm: Sequence[str] = ()) -> list[str]:
        assert self._libs is not None
        conf = self.data_dir / "log4j2.properties"
        return [
            _require("java", "to run the Kafka broker (Java 17 or newer)"),
            *jvm,
            f"-Dlog4j2.configurationFile=file:{conf}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{self._libs}/*",
            main,
            *args,
        ]

    def _format(self, config: Path) -> None:
        """Format the log dir once: a KRaft node refuses to start on an unformatted one."""
        if (Path(self.properties["log.dirs"]) / "meta.properties").exists():
            return
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            random_cluster_id(),
            "-c",
            str(config),
            *scram_format_args(self.scram_users),
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LocalKafkaError(f"kafka-storage format failed:\n{(proc.stdout + proc.stderr)[-4000:]}")

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        """Start the broker and return once it answers a Metadata request."""
        if self.running:
            return self
        self._libs = ensure_jars()
        config = self.data_dir / "server.properties"
        _write_properties(config, self.properties)
        (self.data_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        began = time.monotonic()
        self._format(config)
        cmd = self._java("kafka.Kafka", str(config), jvm=[self.heap])
        # setpriv: the kernel kills the JVM if we die without cleanup (SIGKILL).
        # Main thread only: the kernel's "parent" is the forking *thread*, so a
        # restart() from a worker thread would take the broker down with it.
        setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
        if setpriv and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _kill_pid, self._proc)
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info(
            "Kafka %s up at %s in %.1f s (pid %d)",
            KAFKA_VERSION,
            self.bootstrap,
            self.startup_seconds,
            self._proc.pid,
        )
        return self

    def _wait_ready(self, deadline: float) -> None:
        from kafka.admin import KafkaAdminClient

        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise LocalKafkaError(
                    f"Kafka exited with code {self._proc.returncode}:\n{self.log_tail(errors_first=True)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LocalKafkaError(
                    f"Kafka did not answer within the start timeout:\n{self.log_tail(errors_first=True)}"
                )
            # A plain connect first: it is cheap, the admin client is not.
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
            except OSError:
                time.sleep(0.1)
                continue
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    bootstrap_timeout_ms=int(min(remaining, 5) * 1000),
                    request_timeout_ms=5000,
                )
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except Exception as exc:
                log.debug("broker not ready yet: %s", exc)
                time.sleep(0.2)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Controlled shutdown (SIGTERM to our own PID), SIGKILL if it takes too long."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("Kafka pid %d ignored SIGTERM for %.0f s; killing", proc.pid, timeout)
                proc.kill()
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (unflushed data may be lost)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget()

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def restart(self, down_for: float = 0.0, *, hard: bool = False) -> Self:
        """Stop (or kill, if hard), stay down for `down_for` seconds, start again.

        Same ports and data dir, so clients see the same broker return.
        """
        if hard:
            self.kill()
        else:
            self.stop()
        if down_for > 0:
            time.sleep(down_for)
        return self.start()

    def cleanup(self) -> None:
        """Kill the broker if still up and remove the data dir if we made it."""
        self.kill()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40, *, errors_first: bool = False) -> str:
        """The last lines of the broker's log, for error messages.

        errors_first: prepend the first ERROR lines, because a dying broker's
        tail is its shutdown chatter, not the cause.
        """
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no broker log)"
        tail = text[-lines:]
        if errors_first:
            errors = [ln for ln in text[:-lines] if " ERROR " in ln or "Exception:" in ln][:10]
            if errors:
                tail = [*errors, "...", *tail]
        return "\n".join(tail)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()  # __exit__ is not called when __enter__ fails
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()


# --- Secure listeners (SASL_SSL with SCRAM, mutual TLS) for tests and manual checks ---

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


def scram_format_args(users: Mapping[str, str]) -> list[str]:
    """`kafka-storage format` arguments that create SCRAM users ({name: password}) for
    every SCRAM mechanism: KRaft keeps credentials in the metadata log, so a broker's
    first users are written when its log dir is formatted (KIP-900).

    Names and passwords are passed quoted; they must not contain a double quote.
    """
    args: list[str] = []
    for name, password in users.items():
        if '"' in name + password:
            raise LocalKafkaError("SCRAM user names and passwords must not contain '\"'")
        for mechanism in SCRAM_MECHANISMS:
            args += ["--add-scram", f'{mechanism}=[name="{name}",password="{password}"]']
    return args


@dataclass(frozen=True)
class LocalPki:
    """A throw-away CA, a server certificate for HOST (SAN IP) in a PKCS12 keystore,
    and a client certificate and key (PEM) for mutual TLS, all signed by the CA."""

    directory: Path
    ca_cert: Path
    server_keystore: Path
    keystore_password: str = field(repr=False)
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    cmd = [_require("openssl", "to make test certificates"), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LocalKafkaError(f"openssl {args[0]} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")


def make_test_pki(directory: Path | str, host: str = HOST, days: int = 2) -> LocalPki:
    """Make a CA, a server certificate valid for `host` and a client certificate with
    openssl in `directory` (EC P-256 keys: fast to make, accepted by Java and Python)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    password = secrets.token_hex(16)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        str(days),
        "-subj",
        "/CN=lstmd test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    san = f"IP:{host}" if _is_ip(host) else f"DNS:{host}"
    leaves = {
        "server": (f"/CN={host}", f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
        "client": ("/CN=lstmd-client", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, extensions) in leaves.items():
        (d / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + extensions
        )
        _openssl(
            "req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            str(days),
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    _openssl(
        "pkcs12",
        "-export",
        "-in",
        "server.crt",
        "-inkey",
        "server.key",
        "-certfile",
        "ca.crt",
        "-name",
        "kafka",
        "-out",
        "server.p12",
        "-passout",
        f"pass:{password}",
        cwd=d,
    )
    return LocalPki(
        directory=d,
        ca_cert=d / "ca.crt",
        server_keystore=d / "server.p12",
        keystore_password=password,
        client_cert=d / "client.crt",
        client_key=d / "client.key",
    )


def _is_ip(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def secure_listeners(
    pki: LocalPki, *, sasl_ssl: str = "SASL_SSL", mtls: str | None = "MTLS"
) -> tuple[dict[str, str], dict[str, str]]:
    """`listeners` and `properties` for LocalKafka that add a SASL_SSL listener
    (SCRAM-SHA-256/512, server certificate from `pki`) and, unless `mtls` is None,
    an SSL listener that requires a client certificate signed by the CA.

    Users come from LocalKafka(scram_users=...). Example::

        pki = make_test_pki(tmp_path)
        listeners, props = secure_listeners(pki)
        broker = LocalKafka(listeners=listeners, properties=props,
                            scram_users={"lstmd": "pw"}).start()
        broker.address("SASL_SSL")  # host:port for security_protocol=SASL_SSL
    """
    listeners = {sasl_ssl: "SASL_SSL"}
    if mtls:
        listeners[mtls] = "SSL"
    props: dict[str, str] = {}
    for name in listeners:
        prefix = f"listener.name.{name.lower()}."
        props |= {
            prefix + "ssl.keystore.type": "PKCS12",
            prefix + "ssl.keystore.location": str(pki.server_keystore),
            prefix + "ssl.keystore.password": pki.keystore_password,
            prefix + "ssl.key.password": pki.keystore_password,
        }
    sasl = f"listener.name.{sasl_ssl.lower()}."
    props[sasl + "sasl.enabled.mechanisms"] = ",".join(SCRAM_MECHANISMS)
    for mechanism in SCRAM_MECHANISMS:
        props[sasl + f"{mechanism.lower()}.sasl.jaas.config"] = SCRAM_LOGIN
    if mtls:
        m = f"listener.name.{mtls.lower()}."
        props |= {
            m + "ssl.client.auth": "required",
            m + "ssl.truststore.type": "PEM",
            m + "ssl.truststore.location": str(pki.ca_cert),
        }
    return listeners, props


# --- Authorization (ACLs) for tests: KRaft's StandardAuthorizer, SCRAM users on SASL ---

STANDARD_AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"


def sasl_plaintext_listener(name: str = "SASL") -> tuple[dict[str, str], dict[str, str]]:
    """`listeners` and `properties` for LocalKafka that add a SASL_PLAINTEXT listener
    (SCRAM-SHA-256/512, no TLS); users come from LocalKafka(scram_users=...)."""
    prefix = f"listener.name.{name.lower()}."
    props = {prefix + "sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS)}
    for mechanism in SCRAM_MECHANISMS:
        props[prefix + f"{mechanism.lower()}.sasl.jaas.config"] = SCRAM_LOGIN
    return {name: "SASL_PLAINTEXT"}, props


def authorizer_properties(*super_users: str) -> dict[str, str]:
    """server.properties that turn on ACLs (KRaft's StandardAuthorizer, deny by
    default) with these user names as super users.

    User:ANONYMOUS is always a super user too: the broker reaches its own
    CONTROLLER and PLAINTEXT listeners as ANONYMOUS, and Kafka 4.1 refuses its
    controller registration without it (the broker never comes up). So the
    PLAINTEXT listener stays unrestricted and ACLs bind the users of the other
    listeners. Example::

        listeners, props = sasl_plaintext_listener()
        broker = LocalKafka(listeners=listeners,
                            properties=props | authorizer_properties("admin"),
                            scram_users={"admin": "pw1", "lstmd": "pw2"}).start()
    """
    users = ["ANONYMOUS", *(u for u in super_users if u != "ANONYMOUS")]
    return {
        "authorizer.class.name": STANDARD_AUTHORIZER,
        "super.users": ";".join(f"User:{u}" for u in users),
    }


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    config: Mapping[str, str] | None = None,
    *,
    timeout: float = 30.0,
    **client_config: Any,
) -> None:
    """Create topics ({name: partitions}, replication 1) and wait until every
    partition has a leader; topics that already exist are left as they are.

    `config` applies to every topic; `client_config` goes to KafkaAdminClient
    (security settings for a SASL listener, for example).
    """
    import kafka.errors
    from kafka.admin import KafkaAdminClient

    if not topics:
        return
    spec = {
        name: {"num_partitions": n, "replication_factor": 1, "configs": dict(config or {})}
        for name, n in topics.items()
    }
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client_config)
    try:
        result = admin.create_topics(spec, timeout_ms=int(timeout * 1000), raise_errors=False)
        for topic in result["topics"]:
            code = topic["error_code"]
            if code not in (0, TOPIC_ALREADY_EXISTS):
                error = kafka.errors.kafka_errors.get(code, kafka.errors.UnknownError)
                raise LocalKafkaError(
                    f"cannot create topic {topic['name']}: {error.__name__} "
                    f"{topic.get('error_message') or ''}".rstrip()
                )
        admin.wait_for_topics(list(topics), timeout_ms=int(timeout * 1000))
    finally:
        admin.close()


def _serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = LocalKafka(args.data_dir, port=args.port)
    try:
        broker.start()
        topics = dict(_parse_topic(t) for t in args.topic)
        create_topics(broker.bootstrap, topics)
        print(broker.bootstrap, flush=True)
        print(f"broker log: {broker.log_path}; Ctrl-C stops it", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            if not broker.running:
                print(f"Kafka died:\n{broker.log_tail()}", file=sys.stderr)
                return 1
        return 0
    finally:
        broker.stop()
        if args.data_dir is None:
            broker.cleanup()
        print("Kafka stopped", file=sys.stderr, flush=True)


def _parse_topic(text: str) -> tuple[str, int]:
    name, _, partitions = text.partition(":")
    return name, int(partitions or 1)


def main(argv: Sequence[str] | None = None) -> int:
    """`fetch` downloads the jars; `run` serves a broker until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m daemon.devtools.localkafka",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download Kafka's jars into the cache and print their dir")
    run = sub.add_parser("run", help="run a broker; prints its bootstrap address on stdout")
    run.add_argument("--port", type=int, default=0, help="PLAINTEXT port (default: a free one)")
    run.add_argument("--data-dir", type=Path, help="keep data here (default: a temp dir)")
    run.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="NAME[:PARTITIONS]",
        help="create this topic once up (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # chatty at INFO
    try:
        if args.command == "fetch":
            print(ensure_jars())
            return 0
        return _serve(args)
    except LocalKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
