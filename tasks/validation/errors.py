"""User errors: what the ``dino`` command reports in one message (exit status 2, no traceback unless ``--debug``)
and what no task ever retries. Retries are for transient failures (a storage hiccup, a killed trainer); bad input
fails the same way every time, so retrying it only delays the message."""

from __future__ import annotations

from dino_model.config import ConfigError


class UserInputError(ValueError):
    """Input the user must fix: a path that does not exist, an option out of range, a config field that is unknown.
    The message names the field and the fix."""


class PreflightError(UserInputError):
    """One or more pre-flight checks of ``dino-pretrain`` failed; the message lists each failure."""


class EvaluationInputError(UserInputError):
    """The evaluation inputs are unusable (checked before any heavy work); the message lists every problem."""


class ModelVersionNotFound(UserInputError):
    """The registered model, version or alias does not exist in the MLflow registry (or the reference is not one)."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input (a :class:`UserInputError`, or a training config the config loader refused)."""
    return isinstance(exc, (UserInputError, ConfigError))


def problems_message(title: str, problems: list[str]) -> str:
    """``title: problem`` for one problem, else ``title`` then one ``" - problem"`` line per problem: the format of
    every user error that collects problems."""
    if len(problems) == 1:
        return f"{title}: {problems[0]}"
    return f"{title}:\n" + "\n".join(f" - {p}" for p in problems)


def retry_unless_user_error(task, task_run, state) -> bool:
    """A Prefect ``retry_condition_fn``: retry a failed task run unless it failed on bad input, or on an error that
    says a retry cannot help (``retriable = False``: a training its health monitor stopped would collapse again).
    No Prefect import needed: Prefect calls it with the task, the task run and its failed state."""
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the task's own exception, whatever it is
        return not is_user_error(e) and getattr(e, "retriable", True)
    return True
