"""Private details trainers leave in a LoRA's header: absolute paths (which name the user and their folders),
e-mail addresses and the training folder list. `find_private` reports them; `strip_private` redacts them,
keeping what is useful to publish (a base model's file name without its folders, the dataset statistics).

Values are searched as text and, when they hold JSON (kohya stores `ss_datasets`, `ss_tag_frequency`,
`ss_network_args`... as JSON strings), through every nested key and value.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

FILE_SUFFIXES = "safetensors|ckpt|pt|pth|bin|gguf|png|jpe?g|webp|txt|json|ya?ml|toml"
EMAIL = re.compile(rf"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.(?!(?:{FILE_SUFFIXES})\b)[A-Za-z]{{2,24}}\b")
# an absolute path inside text: POSIX (two segments or more, not part of a URL or a relative path),
# Windows drive (folders may hold spaces: `C:\\Users\\John Doe\\`) or UNC, or home-relative; it ends at whitespace,
# a quote or a comma
PATH_IN_TEXT = re.compile(r"""(?<![\w:/.\\~-])(?:/[^/\s"',;]+(?:/[^/\s"',;]*)+"""
                          r"""|[A-Za-z]:[\\/](?:[^\\/"',;:\n]+[\\/])*[^\s\\/"',;]*"""
                          r"""|\\\\[^\\\s"',;]+\\[^\s"',;]*"""
                          r"""|~[\w.-]*/[^\s"',;]*)""")
WHOLE_PATH = re.compile(r"""^(?:/|[A-Za-z]:[\\/]|\\\\|~[\w.-]*[\\/])""")
USER_IN_PATH = re.compile(r"(?:^|[\\/])(?:home|Users|users)[\\/]([^\\/]+)|^~([\w.-]+)")

# keys whose value is a file name that should not carry its folders
FILE_NAME_KEYS = ("ss_sd_model_name", "ss_vae_name", "ss_output_dir", "ss_resume", "ss_network_weights")
# nested JSON fields that name a folder or file (kohya's subsets: image_dir, metadata_file, conditioning_data_dir)
NESTED_PATH_FIELD = re.compile(r"(?:^|_)(?:dir|dirs|path|file|folder)$")
# keys removed whole, with why, and where their information survives
REMOVED_KEYS = {
    "ss_dataset_dirs": "names the training image folders (their counts also live in ss_datasets)",
}


@dataclass(frozen=True)
class PrivateItem:
    """One private detail: the metadata key, what was found (`found`), why it matters, and the value
    `strip_private` would write for the key (`suggestion`; None removes the key)."""

    key: str
    found: str
    reason: str
    suggestion: str | None

    def as_dict(self) -> dict:
        return {"key": self.key, "found": self.found, "reason": self.reason, "suggestion": self.suggestion}


def _user(path: str) -> str | None:
    m = USER_IN_PATH.search(path)
    return m and (m.group(1) or m.group(2))


def _basename(path: str) -> str:
    """The last component of a POSIX or Windows path (no folders, so no user name; a path that ends at a home
    folder becomes `<path>`)."""
    parts = [p for p in re.split(r"[\\/]", path) if p]
    if not parts or re.fullmatch(r"[A-Za-z]:|~[\w.-]*", parts[-1]) or parts[-1] == _user(path):
        return "<path>"
    return parts[-1]


def _path_reason(path: str) -> str:
    if user := _user(path):
        return f"absolute path naming the user {user!r}"
    return "path in the user's home folder" if path.startswith("~") else "absolute path (reveals the folder layout)"


class _Redactor:
    """Redacts one string at a time and collects (found, reason) for everything it changed."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def text(self, s: str, *, file_name: bool = False) -> str:
        stripped = s.strip()
        # a file name key with folders; one `/` and no `\` is a Hugging Face repo id (owner/name), kept
        with_folders = file_name and ("\\" in stripped or stripped.count("/") > 1)
        if WHOLE_PATH.match(stripped) or with_folders:
            reason = _path_reason(stripped) if WHOLE_PATH.match(stripped) else "file name with its folders"
            self.found.append((stripped, reason))
            return _basename(stripped)

        def path(m: re.Match) -> str:
            self.found.append((m.group(0), _path_reason(m.group(0))))
            return _basename(m.group(0))

        def email(m: re.Match) -> str:
            self.found.append((m.group(0), "e-mail address"))
            return "[e-mail removed]"

        return EMAIL.sub(email, PATH_IN_TEXT.sub(path, s))

    def json(self, value, *, field: str = ""):
        if isinstance(value, str):
            return self.text(value, file_name=bool(NESTED_PATH_FIELD.search(field)))
        if isinstance(value, list):
            return [self.json(v, field=field) for v in value]
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.json(v, field=str(k)) for k, v in value.items()}
        return value


def _nested_json(value: str):
    """The parsed value if `value` is a JSON object or array, else None."""
    if not value.lstrip().startswith(("{", "[")):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def _check(key: str, value: str) -> list[PrivateItem]:
    if key in REMOVED_KEYS:
        return [PrivateItem(key, value[:200], REMOVED_KEYS[key], None)]
    r = _Redactor()
    parsed = _nested_json(value)
    if parsed is not None:
        new = r.json(parsed)
        redacted = json.dumps(new, ensure_ascii=False) if r.found else value
    else:
        redacted = r.text(value, file_name=key in FILE_NAME_KEYS)
    return [PrivateItem(key, found, reason, redacted) for found, reason in r.found]


def find_private(metadata: dict[str, str]) -> list[PrivateItem]:
    """Every private detail in a header's metadata, in key order.

    Example:
        >>> find_private({"ss_sd_model_name": "/home/alice/models/flux1-dev.safetensors"})[0].suggestion
        'flux1-dev.safetensors'
    """
    items: list[PrivateItem] = []
    for key, value in metadata.items():
        items += _check(key, value)
    return items


def strip_private(metadata: dict[str, str]) -> tuple[dict[str, str], list[PrivateItem]]:
    """(metadata with every private detail redacted, what was changed). Keys keep their order; a path
    becomes its last component, an e-mail `[e-mail removed]`, a key in REMOVED_KEYS goes."""
    items = find_private(metadata)
    changed = {i.key: i.suggestion for i in items}
    out = {}
    for key, value in metadata.items():
        if key not in changed:
            out[key] = value
        elif changed[key] is not None:
            out[key] = changed[key]
    return out, items
