"""The method registry: each distillation method is one module that calls ``register_method``.

A :class:`MethodSpec` declares everything the engine, the CLI and the docs need to know:

* ``terms``: its loss terms (:class:`LossTerm`: metric name, module builder, the weight it is
  multiplied by, the teacher view it compares with: ``main`` = the stored view the sample drew,
  ``me``/``adv`` = an extra input replayed from the store);
* ``defaults``: the resolved values per student family (``one_stage``/``two_stage``, taken from
  the model registry's ``register_head(..., family=...)``), ``head_defaults`` per registered
  head where a method's published configs differ by head;
* ``store``: what it reads from a teacher store (:class:`StoreNeeds`; None = no store);
* ``sal``: stage-wise over every listed teacher, else one stage with the last teacher;
* ``options``: its own options (:class:`MethodOption`: name, type, default, help, check), from
  which the flags of ``dfmsd distill`` (:func:`options_class`) and the "not of this method"
  errors are generated.

The registry loads every module of ``dfmsd_cli.distill.methods`` at the first lookup (as the
model registry does), so a new method is one module there, or a ``register_method`` call
anywhere before the run (docs/methods_api.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfmsd_cli.errors import UserError, suggest

if TYPE_CHECKING:
    from torch import Tensor, nn

FAMILIES = ("one_stage", "two_stage")


@dataclass(frozen=True)
class MethodConfig:
    """Everything the engine needs to know about a method (all values resolved; JSON-able).

    ``stage_loss`` names the per-stage feature loss (``dfm``, ``mgd``, ``pkd``, ``fgd`` or None)
    weighted by ``alpha``; ``me`` adds β·L_ME (DFM on the stored enhanced view); ``sfa`` adds
    γ·L_SFA; ``sal`` runs every listed teacher in order (otherwise only the last one).
    """

    name: str
    family: str
    stage_loss: str | None
    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0
    sal: bool = False
    me: bool = False
    sfa: bool = False
    me_stages: str = "last"
    sfa_levels: int | None = 3  # the N finest shared levels SFA aligns (None: all); Table 9
    kd_warmup: int = 0  # iterations of linear warm-up of every distillation weight (0: off)
    adv: bool = False  # L_adv in the last stage when its store has the 'adv' view
    adv_required: bool = False  # --adv: a last-stage store without the 'adv' view is an error
    adv_weight: float = 0.0
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # printed at start, kept in the resolved config (e.g. a part
    # of the method this version cannot run)

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.name)

    @property
    def needs_store(self) -> bool:
        """Whether any loss term of the method is on (then stages read teacher stores)."""
        spec = self.spec
        return spec.store is not None and any(t.enabled(self) for t in spec.terms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"method {self.name} ({self.family} student)"]
        if self.stage_loss:
            parts.append(f"L_{self.stage_loss} α={self.alpha:g}")
        if self.me:
            parts.append(f"L_ME β={self.beta:g} ({self.me_stages} stage(s))")
        if self.adv:
            parts.append(f"L_adv w={self.adv_weight:g} (last stage, if stored)")
        if self.sfa:
            lv = "all levels" if self.sfa_levels is None else f"{self.sfa_levels} finest levels"
            parts.append(f"L_SFA γ={self.gamma:g} ({lv})")
        if self.kd_warmup:
            parts.append(f"KD warm-up {self.kd_warmup} it")
        parts.append("SAL" if self.sal else "single stage")
        if self.loss_kwargs:
            parts.append(" ".join(f"{k}={v}" for k, v in self.loss_kwargs.items()))
        return "\n".join([", ".join(parts), *(f"note: {n}" for n in self.notes)])


# -- how a term's module is called: (module, student FPN maps, TeacherView, targets) -> loss
def call_features(mod: nn.Module, feats: dict[int, Tensor], teacher, targets) -> Tensor:
    """``mod(S, T, valid)``: features only (e.g. PKD/SFA, a plain L2)."""
    return mod(feats, teacher.features, teacher.valid)


def call_full(mod: nn.Module, feats: dict[int, Tensor], teacher, targets) -> Tensor:
    """``mod(S, T, valid, stats, targets)``: plus attention statistics and ground truth."""
    return mod(feats, teacher.features, teacher.valid, teacher.stats, targets)


def _always(cfg: MethodConfig) -> bool:
    return True


@dataclass(frozen=True)
class LossTerm:
    """One weighted loss term: ``kd_scale · cfg.<weight> · call(build(...), S, T, targets)``.

    ``build(cfg, levels, student_channels, teacher_channels) -> nn.Module``; ``view``: the
    teacher view it compares with (``main``: the drawn stored view, the student's training
    forward; ``me``/``adv``: the student's backbone+FPN on that view's input); ``enabled``:
    whether the resolved config turns it on (an ablation flag, e.g. ``--no-sfa``).
    """

    metric: str  # the logged name: loss_kd, loss_sfa, loss_me, loss_adv, ...
    key: str  # its module's key in the stage's ModuleDict (checkpointed: keep it stable)
    build: Callable[[MethodConfig, list[int], int, int], nn.Module]
    weight: str | Callable[[MethodConfig], float]  # a MethodConfig field (alpha, beta, gamma,
    # adv_weight), or a function of the config (a weight kept in the method's loss_kwargs)
    view: str = "main"
    call: Callable[..., Tensor] = call_full
    enabled: Callable[[MethodConfig], bool] = _always
    # the term reads the student's class logits (main view): the training forward then runs
    # with ``return_logits=True`` and ``call`` gets ``logits=`` ({stride: (B, A·K, h, w)}) and
    # ``peers=`` (the stage's loss modules, e.g. SLD reads SFD's aligned features); with
    # ``--online`` the live teacher then also gives its class logits (``TeacherView.logits``)
    logits: bool = False
    # the term runs parts of the student model itself (CrossKD: its head's first tower convs
    # on the FPN maps): ``call`` then gets ``student=`` (the student) and ``peers=``
    student: bool = False

    def weight_of(self, cfg: MethodConfig) -> float:
        return self.weight(cfg) if callable(self.weight) else getattr(cfg, self.weight)


@dataclass(frozen=True)
class StoreNeeds:
    """What a method reads from a teacher store (documentation and the plan's checks)."""

    features: bool = True
    attention: bool = False  # the stored attention statistics (att_spatial / att_channel)
    boxes: bool = False  # the teacher's stored detections
    views: tuple[str, ...] = ()  # extra views beyond orig/hflip: "me", "adv"


@dataclass(frozen=True)
class MethodOption:
    """A method's own option: ``--name-with-dashes``, keyword ``name`` of :func:`method_config`.

    ``default``: the CLI's default (None: the method's resolved default applies); ``check``
    returns the problem with a value (None when fine); ``apply(cfg, value) -> cfg`` sets it
    (default: the MethodConfig field ``target`` or ``loss_kwargs[target]`` with ``kwarg``);
    ``what`` completes "--flag sets ``what`` of dfmsd/dmkd, not of 'mgd'".
    """

    name: str
    type: type
    default: Any
    help: str
    what: str = ""
    check: Callable[[Any], str | None] | None = None
    target: str | None = None
    kwarg: bool = False  # target is a key of loss_kwargs
    apply: Callable[[MethodConfig, Any], MethodConfig] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def set(self, cfg: MethodConfig, value: Any) -> MethodConfig:
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise UserError(f"{self.flag} {problem}")
        if self.apply is not None:
            return self.apply(cfg, value)
        target = self.target or self.name
        if self.kwarg:
            return replace(cfg, loss_kwargs={**cfg.loss_kwargs, target: value})
        return replace(cfg, **{target: self.type(value)})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str  # one line with its citation
    terms: tuple[LossTerm, ...] = ()
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # family -> cfg values
    head_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # head -> overrides
    store: StoreNeeds | None = None
    sal: bool = False
    stage_loss: str | None = None  # the label of its main feature loss (summary, viz masks)
    options: tuple[MethodOption, ...] = ()
    check: Callable[[MethodConfig, dict[str, Any]], MethodConfig] | None = None  # cross-option
    # after the stages' stores are opened: (cfg, student, stores, online, teachers=[the stages'
    # teacher names]) -> cfg, e.g. a term that needs what only some stores hold or, --online,
    # only some teachers give (samkd's SLD: teacher logits)
    with_stores: Callable[..., MethodConfig] | None = None

    def resolve_defaults(self, family: str, head: str) -> dict[str, Any]:
        values = dict(self.defaults.get(family, {}))
        values["loss_kwargs"] = dict(values.get("loss_kwargs", {}))
        extra = self.head_defaults.get(head, {})
        if "loss_kwargs" in extra:
            values["loss_kwargs"] = {**values.get("loss_kwargs", {}), **extra["loss_kwargs"]}
        values.update({k: v for k, v in extra.items() if k != "loss_kwargs"})
        return values


# the options every method accepts: the weights of its terms and the KD warm-up
def _check_warmup(v: Any) -> str | None:
    if int(v) < 0:
        return f"must be 0 (off) or a number of iterations, got {v}"
    return None


COMMON_OPTIONS: tuple[MethodOption, ...] = (
    MethodOption("alpha", float, None, "Weight of the stage loss (default per method and "
                 "student family)."),
    MethodOption("beta", float, None, "Weight of L_ME (dfmsd: 0.25)."),
    MethodOption("gamma", float, None, "Weight of L_SFA (dfmsd: 6)."),
    MethodOption("kd_warmup", int, None, "Ramp every distillation weight linearly from 0 over "
                 "the first N iterations of each stage (0: off, the default).",
                 check=_check_warmup),
)  # fmt: skip

_METHODS: dict[str, MethodSpec] = {}
_LOADED = False


def register_method(spec: MethodSpec | str, **fields: Any) -> MethodSpec:
    """Register ``spec`` under ``spec.name`` (replacing a method of that name);
    ``register_method("name", description=..., terms=..., ...)`` builds the spec."""
    if isinstance(spec, str):
        spec = MethodSpec(spec, **fields)
    elif fields:
        raise TypeError("register_method(spec) takes no further fields")
    _METHODS[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def _load_all() -> None:
    """Import every module of this package once so that each registers its method."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    # the folder, not the package: importing the package from here would be an import circle
    package = __name__.rsplit(".", 1)[0]
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name != "registry":
            importlib.import_module(f"{package}.{info.name}")


def list_methods() -> list[str]:
    """Registered method names, in registration order (dfmsd first)."""
    _load_all()
    order = ("dfmsd", "dmkd", "mgd", "pkd", "fgd", "none")  # the docs' order; others after
    return sorted(_METHODS, key=lambda n: (order.index(n) if n in order else len(order), n))


def get_method(name: str) -> MethodSpec:
    _load_all()
    if name not in _METHODS:
        names = list_methods()
        raise UserError(
            f"unknown method '{name}'{suggest(name, names)}: use one of {', '.join(names)}"
        )
    return _METHODS[name]


def method_help() -> str:
    """``--method``'s help: the registered method names."""
    names = list_methods()
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    return f"{listed} (none: the student alone; docs/method.md has each one's losses)."


def all_options() -> dict[str, MethodOption]:
    """Every option name any registered method declares (the first declaration), plus the
    common ones: what the CLI and ``resolve_method`` route to :func:`method_config`."""
    out = {o.name: o for o in COMMON_OPTIONS}
    for name in list_methods():
        for o in get_method(name).options:
            out.setdefault(o.name, o)
    return out


def options_class() -> type:
    """Every registered method option (:func:`all_options`) as an option dataclass
    (``dfmsd_cli.utils.options.opt`` fields), made on demand: ``dfmsd distill`` generates its
    method flags from it, so a newly registered method's options become flags with no other
    edit. A switch that defaults to on is its negative flag (``sal`` -> ``--no-sal``), one that
    defaults to None both (``--adv/--no-adv``); an option with default None is optional."""
    from dataclasses import make_dataclass

    from dfmsd_cli.utils.options import opt

    fields = []
    for o in all_options().values():
        dash = o.name.replace("_", "-")
        if o.type is bool and o.default is True:
            f = opt(True, o.help, flag=f"--no-{dash}", negate=True)
        elif o.type is bool and o.default is None:
            f = opt(None, o.help, flag=f"--{dash}/--no-{dash}")
        else:
            f = opt(o.default, o.help)
        hint = o.type if o.default is not None else o.type | None
        fields.append((o.name, hint, f))
    return make_dataclass("MethodOptions", fields, kw_only=True)


def option_help(name: str) -> str:
    """The help text of option ``name`` as the method modules declare it (for the CLI): every
    distinct text, when several methods declare the option with their own."""
    helps = [all_options()[name].help]
    for method in list_methods():
        for o in get_method(method).options:
            if o.name == name and o.help not in helps:
                helps.append(o.help)
    return " ".join(helps)


def declared_options(method: str) -> dict[str, MethodOption]:
    """The options ``method`` accepts: the common ones and its own."""
    return {o.name: o for o in (*COMMON_OPTIONS, *get_method(method).options)}


def owners(option: str) -> list[str]:
    """The registered methods that declare ``option``."""
    return [n for n in list_methods() if any(o.name == option for o in get_method(n).options)]


def student_family(student: str) -> str:
    """``one_stage`` or ``two_stage``: the family its head registered (model registry)."""
    from dfmsd_cli.models.registry import get_spec

    spec = get_spec(student)
    if spec.family not in FAMILIES:
        raise UserError(
            f"no distillation defaults for student head '{spec.head}' ({student}): its head "
            "registers no family; use a retina, fcos, gfl, frcnn or mrcnn student"
        )
    return spec.family


def method_config(method: str, student: str, **overrides: Any) -> MethodConfig:
    """Defaults of ``method`` for ``student``'s family (and head), with ``overrides`` applied.

    ``overrides`` are option values (None: not given). An option the method does not declare
    is an error naming the methods that do; a switch set to False that the method does not
    have is already off and accepted (``--no-sfa`` on a single-stage baseline).
    """
    from dfmsd_cli.models.registry import get_spec

    spec = get_method(method)
    family = student_family(student)
    head = get_spec(student).head
    values = {"sal": spec.sal, **spec.resolve_defaults(family, head)}
    cfg = MethodConfig(method, family, spec.stage_loss, **values)
    declared = declared_options(method)
    known = all_options()
    given = {k: v for k, v in overrides.items() if v is not None}
    for name, value in given.items():
        if name not in known:
            raise TypeError(f"method_config() got an unknown option {name!r}")
        if name not in declared:
            if known[name].type is bool and not value:
                continue
            raise UserError(_not_declared(known[name], method))
        cfg = declared[name].set(cfg, value)
    if spec.check is not None:
        cfg = spec.check(cfg, given)
    return cfg


def _not_declared(opt: MethodOption, method: str) -> str:
    who = owners(opt.name)
    if opt.type is bool:
        return (
            f"{opt.flag} is part of --method {'/'.join(who)} only: drop it or use --method {who[0]}"
        )
    return (
        f"{opt.flag} sets {opt.what or 'an option'} of {'/'.join(who)}, not of '{method}': drop it"
    )


def stage_terms(cfg: MethodConfig, views: tuple[str, ...] = ("main",)) -> list[LossTerm]:
    """The terms of ``cfg``'s method a stage computes: enabled, on one of ``views``."""
    return [t for t in cfg.spec.terms if t.view in views and t.enabled(cfg)]


def build_stage_losses(
    cfg: MethodConfig,
    levels: list[int],
    student_channels: int,
    teacher_channels: int,
    with_me: bool = False,
    with_adv: bool = False,
) -> nn.ModuleDict:
    """One stage's loss modules ``{term.key: module}``: the method's enabled terms on the main
    view, plus those on the ``me``/``adv`` views when the stage has them (its store holds the
    view). Built in the spec's order (module initialisation draws from the RNG)."""
    from torch import nn

    views = ("main",) + (("me",) if with_me else ()) + (("adv",) if with_adv else ())
    mods = {
        t.key: t.build(cfg, levels, student_channels, teacher_channels)
        for t in stage_terms(cfg, views)
    }
    return nn.ModuleDict(mods)
