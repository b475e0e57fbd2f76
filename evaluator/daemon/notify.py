"""Where a fired alert goes besides the daemon log: a Slack-compatible webhook and `wandb.alert`.

A channel is an object with `.name` and `.record(notice)` that raises on failure, so `outbox.Outbox` carries
alerts exactly as it carries results to the sinks: one worker thread per channel, one call in flight, a call past
its timeout counted as failed. The ledger keeps each (alert, channel) pending until the channel accepted it; the
daemon retries with backoff (`alerts.backoff_seconds`, doubling), so a webhook that is down never blocks
evaluation or recording and no alert is lost. The webhook URL is a secret: read from the environment variable
named by `alerts.webhook_env`, never logged, never written to the ledger (errors are redacted).
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Mapping, Optional

from evaluator.common.errors import EvaluatorError
from evaluator.common.secrets import MASK, redact

log = logging.getLogger("evaluator")


@dataclass(frozen=True)
class Notice:
    """One alert as the channels see it (a row of the ledger's `alerts` table)."""

    id: int
    rule: str
    run: str
    iteration: int
    benchmark: str
    message: str
    project: str = ""

    @classmethod
    def from_row(cls, row: dict, project: str = "") -> "Notice":
        return cls(row["id"], row["rule"], row["run"], row["iteration"], row["benchmark"], row["message"], project)

    @property
    def title(self) -> str:
        return f"regression alert #{self.id}: {self.run}@{self.iteration}/{self.benchmark}"

    def text(self) -> str:
        where = f"[{self.project}] " if self.project else ""
        return f"{where}alert #{self.id}: {self.message}"


class WebhookChannel:
    """POST {"text": ...} as JSON (Slack incoming webhooks, Mattermost, Teams connectors take it); 2xx = delivered."""

    name = "webhook"

    def __init__(self, url: str, timeout_s: float):
        self._url = url
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # the URL is a secret
        return f"WebhookChannel({MASK})"

    def record(self, notice: Notice) -> None:
        body = json.dumps({"text": notice.text()}).encode()
        try:  # urllib's errors (a ValueError for a malformed URL too) may quote the URL: redacted below
            request = urllib.request.Request(self._url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webhook answered HTTP {e.code} {self._clean(e.reason)}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise RuntimeError(f"webhook unreachable: {self._clean(reason)}") from None

    def _clean(self, text) -> str:
        return redact(str(text).replace(self._url, MASK))


class WandbAlertChannel:
    """`wandb.alert` on the run's W&B run, through the wandb sink (online only: W&B sends alerts from its server)."""

    name = "wandb"

    def __init__(self, sink):
        self.sink = sink

    def record(self, notice: Notice) -> None:
        self.sink.alert(notice.run, notice.title, notice.text())


def make_channels(section, sinks: list, environ: Mapping[str, str] = os.environ) -> list:
    """The channels the `alerts:` section asks for. The webhook's variable must be set (exit 2 otherwise: an alert
    that can never be sent is a set-up error); wandb.alert needs the wandb sink running online (offline: the log
    says it is skipped)."""
    channels: list = []
    if not section.rules:
        return channels
    url = webhook_url(section, environ)
    if url:
        channels.append(WebhookChannel(url, section.timeout_seconds))
    wandb_sink = next((s for s in sinks if getattr(s, "name", "") == "wandb"), None)
    if section.wandb and wandb_sink is not None:
        mode = wandb_mode(wandb_sink)
        if mode == "online":
            channels.append(WandbAlertChannel(wandb_sink))
        else:
            log.info("alerts: wandb.alert skipped: W&B runs %s (alerts need an online run); the log%s has them",
                     mode, " and the webhook" if section.webhook_env else "")
    return channels


def webhook_url(section, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The webhook URL from the variable `alerts.webhook_env` names (None: no webhook); unset is a config error."""
    if not section.webhook_env or not section.rules:
        return None
    url = environ.get(section.webhook_env, "").strip()
    if not url:
        raise EvaluatorError(f"auto_eval.alerts.webhook_env: the environment variable {section.webhook_env} is not "
                             f"set (it holds the webhook URL); export it, or remove webhook_env")
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:  # the URL is a secret: not shown
        raise EvaluatorError(f"auto_eval.alerts.webhook_env: {section.webhook_env}: expected an http:// or https:// URL "
                             f"with a host (e.g. https://hooks.slack.com/services/...), got something else")
    return url


def wandb_mode(sink) -> Optional[str]:
    from recorder.wandb_sink import resolve_mode

    return resolve_mode(sink.ws.mode)
