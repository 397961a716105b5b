"""The training recipes, one per ``attack.mode`` (:class:`~featdenoise.training.recipes.base.
Recipe`): ``pgd`` (the paper's, Sec. 5), ``free`` (Shafahi et al. 2019) and ``fast`` (Wong et al.
2020). The loop asks its recipe to train on each batch, to do its bookkeeping after each epoch and
whether training stopped; it never branches on the mode."""

from featdenoise.training.config import Config
from featdenoise.training.recipes.base import Recipe
from featdenoise.training.recipes.fast import FastRecipe
from featdenoise.training.recipes.free import FreeRecipe
from featdenoise.training.recipes.pgd import PGDRecipe

RECIPES: dict[str, type[Recipe]] = {"pgd": PGDRecipe, "free": FreeRecipe, "fast": FastRecipe}


def recipe_class(cfg: Config) -> type[Recipe]:
    """The recipe of ``cfg.attack.mode`` (one of :data:`featdenoise.training.checks.
    ATTACK_MODES`, checked when the config was loaded)."""
    return RECIPES[cfg.attack.mode]


__all__ = ["RECIPES", "FastRecipe", "FreeRecipe", "PGDRecipe", "Recipe", "recipe_class"]
