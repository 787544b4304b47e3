"""Default training recipes (epochs, learning rate) per model family, measured on digits and animals.

:func:`workbench.train.trained` uses :func:`default_recipe` when it is given no ``epochs`` / ``lr``.
Every recipe trains with AdamW, batch 64 and a cosine schedule (what ``trained`` does). The held-out
accuracy each recipe reaches is measured by ``python -m workbench.train.recipes`` and tabled in
``docs/recipes.md``; ``tests/reports/test_recipes.py`` checks on a small budget that each one learns.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Recipe", "RECIPES", "default_recipe", "recipe_family"]


@dataclass(frozen=True)
class Recipe:
    """How long and how fast a model family trains: ``epochs`` at AdamW learning rate ``lr``."""

    epochs: int
    lr: float
    family: str
    models: str  # the names the family covers, in words


RECIPES: dict[str, Recipe] = {
    recipe.family: recipe
    for recipe in (
        # The distill report's committed results (reports/results/) used a 6-epoch, 5e-3 cnn teacher.
        Recipe(6, 5e-3, "cnn", "cnn, bench_cnn"),
        Recipe(15, 5e-3, "cnn_small", "cnn_small"),
        Recipe(15, 1e-3, "mlp", "mlp"),
        Recipe(30, 1e-3, "vit", "vit (the built-in tiny ViT)"),
        Recipe(20, 1e-3, "mixer", "mixer (the built-in tiny MLP-Mixer)"),
        Recipe(20, 5e-4, "timm_vit", "timm ViTs and DeiTs, e.g. vit_tiny_patch16_224"),
        Recipe(10, 1e-3, "timm_resnet", "timm ResNets, e.g. resnet18"),
        Recipe(10, 1e-3, "timm", "any other timm model (not measured: the ResNet recipe)"),
    )
}
"""Recipes by family; :func:`recipe_family` names the family of a model name."""

_BUILTIN_FAMILIES = {"cnn": "cnn", "bench_cnn": "cnn", "cnn_small": "cnn_small", "mlp": "mlp", "vit": "vit",
                     "mixer": "mixer", "resnet": "cnn"}
_TIMM_FAMILIES = {"vision_transformer": "timm_vit", "deit": "timm_vit", "resnet": "timm_resnet"}


def recipe_family(name: str) -> str:
    """The recipe family of a model name: a built-in's own family, ``"timm_vit"`` / ``"timm_resnet"``
    by the timm module that defines it, ``"timm"`` for any other timm model.

    Example:
        >>> recipe_family("cnn_small"), recipe_family("vit_tiny_patch16_224"), recipe_family("resnet18")
        ('cnn_small', 'timm_vit', 'timm_resnet')
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name in _BUILTIN_FAMILIES:
        return _BUILTIN_FAMILIES[name]
    import timm
    import timm.models

    if not timm.is_model(name):
        from workbench.models.factory import _unknown_name_message

        raise ValueError(f"no training recipe: {_unknown_name_message(name)}")
    arch = timm.models.get_arch_name(name)
    for module, family in _TIMM_FAMILIES.items():
        if timm.models.is_model_in_modules(arch, [module]):
            return family
    return "timm"


def default_recipe(name: str) -> Recipe:
    """The default recipe of model ``name`` (see :data:`RECIPES` and ``docs/recipes.md``).

    Example:
        >>> default_recipe("cnn")
        Recipe(epochs=6, lr=0.005, family='cnn', models='cnn, bench_cnn')
        >>> default_recipe("vit").epochs
        30
    """
    return RECIPES[recipe_family(name)]


MEASURED_MODELS = ("cnn", "cnn_small", "mlp", "vit", "mixer", "resnet18", "vit_tiny_patch16_224")
"""One model per family: the models ``python -m workbench.train.recipes`` trains for ``docs/recipes.md``."""


def recipe_table(names: tuple[str, ...] = MEASURED_MODELS, datasets: tuple[str, ...] = ("digits", "animals"),
                 progress: bool = False) -> str:
    """Train (or load from the cache) each model by its default recipe on each data set and return a
    Markdown table: recipe, parameters, held-out accuracy after the last epoch, its best before the last
    quarter of the epochs (a rise between the two means the run had not converged), and chance.

    Example:
        >>> from workbench.train.recipes import recipe_table
        >>> recipe_table(("cnn",), ("digits",)).splitlines()[0]  # doctest: +SKIP
        '| model | family | data | epochs | lr | parameters | accuracy % | best before the last quarter % | chance % |'
    """
    from workbench.models.stats import count_parameters
    from workbench.train.cache import trained, training_record

    lines = ["| model | family | data | epochs | lr | parameters | accuracy % | best before the last quarter % "
             "| chance % |", "|---|---|---|---|---|---|---|---|---|"]
    for dataset in datasets:
        for name in names:
            model = trained(name, dataset, progress=progress)
            record = training_record(model)
            accuracies = record.eval_accuracy
            quarter = max(1, round(len(accuracies) / 4))
            before = f"{100 * max(accuracies[:-quarter]):.1f}" if len(accuracies) > quarter else "—"
            lines.append(f"| {name} | {record.recipe} | {dataset} | {record.epochs} | {record.lr:g} "
                         f"| {count_parameters(model):,} | {100 * record.final_accuracy:.1f} | {before} "
                         f"| {100 / record.num_classes:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m workbench.train.recipes [dataset ...]
    import sys

    import torch

    torch.set_num_threads(1)  # tiny nets on a shared CPU
    print(recipe_table(datasets=tuple(sys.argv[1:]) or ("digits", "animals"), progress=False), flush=True)
