"""What the OpenAI front is told: which Triton to talk to and how, the names it serves, its limits and which remote
images it may fetch. One object for `bunny-openai` and for `bunny-serve --openai-port`, and one definition of the
flags they share."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

DEFAULT_MODEL = "bunny"
DEFAULT_MEDIA_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class FrontOptions:
    triton_url: str
    model: str = DEFAULT_MODEL                  # the model's name in Triton
    served_model_names: tuple[str, ...] = ()    # the names clients use; the first is the default; () = (model,)
    ssl: bool = False
    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None
    headers: dict[str, str] = field(default_factory=dict)   # sent with every call to Triton
    allowed_media_domains: tuple[str, ...] = ()  # hosts http(s) image URLs may name; none: no remote images
    max_request_bytes: int | None = None         # None: sized from the model's image limits
    media_timeout_s: float = DEFAULT_MEDIA_TIMEOUT_S

    @property
    def names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)


def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """The flags bunny-serve passes through to its front and bunny-openai takes too."""
    p.add_argument("--served-model-name", nargs="+", action="extend", default=[], metavar="NAME",
                   help="the model name(s) clients use; the first is the default and the id /v1/models lists "
                        "first (default: the Triton model's name)")
    p.add_argument("--allowed-media-domains", nargs="+", action="extend", default=[], metavar="HOST",
                   help="hosts whose http/https image URLs the front fetches, matched exactly (default: none; "
                        "only data URLs)")
    p.add_argument("--max-request-bytes", type=_positive_int, metavar="N",
                   help="largest request body (413 beyond it); default: room for the model's max_images_per_request "
                        "images of max_image_bytes, base64-encoded, plus 1 MiB of text")
    p.add_argument("--media-timeout-s", type=_positive_float, default=DEFAULT_MEDIA_TIMEOUT_S, metavar="S",
                   help=f"how long fetching one remote image may take (default {DEFAULT_MEDIA_TIMEOUT_S:g})")


def add_triton_arguments(p: argparse.ArgumentParser) -> None:
    """How bunny-openai reaches a Triton of its own choosing."""
    p.add_argument("--triton-url", required=True, metavar="HOST:PORT", help="Triton's gRPC endpoint")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model's name in Triton (default {DEFAULT_MODEL})")
    p.add_argument("--ssl", action="store_true", help="talk TLS to Triton's gRPC endpoint")
    p.add_argument("--root-certificates", metavar="FILE", help="PEM roots to check Triton's certificate (--ssl)")
    p.add_argument("--private-key", metavar="FILE", help="PEM client key for mutual TLS (--ssl)")
    p.add_argument("--certificate-chain", metavar="FILE", help="PEM client certificate chain for mutual TLS (--ssl)")
    p.add_argument("--header", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="a gRPC metadata header sent with every call to Triton (repeatable), e.g. an auth token")


def from_args(args: argparse.Namespace, triton_url: str | None = None, model: str | None = None) -> FrontOptions:
    """The options of parsed arguments (bunny-serve gives its own Triton's url and model); ValueError names a bad
    flag."""
    tls = {k: getattr(args, k, None) for k in ("root_certificates", "private_key", "certificate_chain")}
    ssl = bool(getattr(args, "ssl", False))
    if not ssl and any(tls.values()):
        raise ValueError("--root-certificates, --private-key and --certificate-chain need --ssl")
    for name, path in tls.items():
        if path is not None:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise ValueError(f"--{name.replace('_', '-')} {path}: {e.strerror or e}") from None
    return FrontOptions(
        triton_url=triton_url or args.triton_url, model=model or args.model,
        served_model_names=tuple(dict.fromkeys(args.served_model_name)), ssl=ssl, **tls,
        headers=_headers(getattr(args, "header", [])),
        allowed_media_domains=tuple(_host(d) for d in args.allowed_media_domains),
        max_request_bytes=args.max_request_bytes, media_timeout_s=args.media_timeout_s)


def _headers(items: list[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--header takes KEY=VALUE, got {item!r}")
        headers[key.strip().lower()] = value.strip()   # gRPC metadata keys are lower case
    return headers


def _host(domain: str) -> str:
    host = domain.strip().lower().strip("[]")   # an IPv6 address may come bracketed, as in a URL
    if not host or "/" in host or host.count(":") == 1:   # a URL, or host:port
        raise ValueError(f"--allowed-media-domains takes host names (example.com), got {domain!r}")
    return host


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
