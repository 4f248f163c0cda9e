"""Experiment tracking with Weights & Biases, beside TensorBoard (``pip install -e .[wandb]``).

Megatron-LM's flags: ``--wandb-project`` turns it on, ``--wandb-exp-name`` names the run (required
then, as in Megatron-LM) and ``--wandb-save-dir`` is where wandb keeps the run's files (Megatron-LM's
default: ``<--save>/wandb``). One process writes (the one that writes the metrics file), with the
values already reduced over the world; the x axis is the global iteration, as in TensorBoard.

The run is offline (files only, ``wandb sync <run folder>`` uploads it later) when
``WANDB_MODE=offline`` or when no API key is found (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``
or a netrc entry for ``WANDB_BASE_URL``'s host, default api.wandb.ai, as ``wandb login`` writes);
otherwise online. ``WANDB_MODE=disabled`` writes nothing.

A run with ``--save`` keeps its W&B run id in ``<--save>/wandb_run_id`` (written at the first
start), so a resumed run (a requeued job) continues the same W&B run (``resume="allow"``). The
run's closing summary (summary.json's figures) goes to the W&B run's summary.
"""

import logging
import netrc
import os
import secrets
import string
import urllib.parse
from typing import Dict, Mapping, Optional

from megatron_patch.errors import ArgumentError, UserError
from megatron_patch.runtime import atomic_file

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e .[wandb]"
RUN_ID_FILE = "wandb_run_id"


def read_run_id(folder: Optional[str]) -> Optional[str]:
    """The W&B run id kept in ``folder`` (``--save``); None: none yet, or no folder."""
    if not folder:
        return None
    try:
        with open(os.path.join(folder, RUN_ID_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def api_key_available() -> bool:
    """Whether wandb would find credentials without asking (see the module docstring)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``offline``, ``online`` or ``disabled``, from WANDB_MODE and the credentials found."""
    requested = os.environ.get("WANDB_MODE", "").strip().lower()
    if requested in ("offline", "dryrun", "disabled"):
        return "disabled" if requested == "disabled" else "offline"
    return "online" if api_key_available() else "offline"


class WandbWriter:
    """Scalars of one run to a W&B run.

    Args:
        project: ``--wandb-project``.
        experiment_name: ``--wandb-exp-name``, the run's display name.
        save_dir: ``--wandb-save-dir``; wandb writes ``<save_dir>/wandb/<run folder>``. Created.
        config: the run's settings (flags), stored as the run's config; JSON-able values.
        id_folder: the ``--save`` folder, which keeps the run's id (None: a new W&B run each time).
    """

    def __init__(
        self, project: str, experiment_name: str, save_dir: str, config: Mapping, id_folder: Optional[str] = None
    ) -> None:
        if not project:
            raise ArgumentError("--wandb-project is empty: name the W&B project, or leave the flag out")
        if not experiment_name:
            raise ArgumentError(f"--wandb-project {project} needs --wandb-exp-name: name the run")
        if not save_dir:
            raise ArgumentError("--wandb-save-dir is empty: name a folder (default: <--save>/wandb)")
        try:
            import wandb
        except ImportError:
            raise UserError(f"--wandb-project {project} needs the wandb package: run '{INSTALL_HINT}'") from None
        try:
            os.makedirs(save_dir, exist_ok=True)
        except OSError as error:
            raise ArgumentError(
                f"--wandb-save-dir {save_dir}: cannot create it ({error.strerror}); choose a writable folder"
            ) from None
        self.mode = wandb_mode()
        run_id = read_run_id(id_folder)
        resumed = run_id is not None
        if id_folder and not resumed:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb's
        self.run = wandb.init(
            project=project,
            name=experiment_name,
            dir=save_dir,
            config=dict(config),
            mode=self.mode,
            settings=wandb.Settings(console="off", silent=True),
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        )
        if id_folder and not resumed:
            atomic_file.write_text(os.path.join(id_folder, RUN_ID_FILE), run_id + "\n")
        self.folder = getattr(self.run, "dir", None) and os.path.dirname(self.run.dir)
        if self.mode == "offline":
            logger.info(
                "W&B run %s offline in %s (upload it with: wandb sync %s)", experiment_name, self.folder, self.folder
            )
        elif self.mode == "online":
            logger.info("W&B run %s: %s", experiment_name, getattr(self.run, "url", None))
        if resumed:
            logger.info("W&B run %s continues run id %s (%s)", experiment_name, run_id, RUN_ID_FILE)

    def log(self, scalars: Mapping[str, Optional[float]], step: int) -> None:
        """Log ``{tag: value}`` at global iteration ``step`` (non-decreasing over calls); None values
        (a metric this step does not have) are left out, as for TensorBoard."""
        if self.run is None:
            raise RuntimeError("WandbWriter.log after close()")
        values: Dict[str, float] = {tag: float(value) for tag, value in scalars.items() if value is not None}
        if values:
            self.run.log(values, step=int(step))

    def write_summary(self, summary: Mapping) -> None:
        """The run's closing summary (summary.json's figures) as the W&B run's summary."""
        if self.run is not None:
            self.run.summary.update(dict(summary))

    def close(self) -> None:
        """Finish the run (writes its last records); calling it again does nothing."""
        if self.run is not None:
            self.run.finish()
            self.run = None
