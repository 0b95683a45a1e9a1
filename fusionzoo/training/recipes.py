"""The built-in training recipes, registered by name for ``Task.recipe`` to choose from.

``finetune`` (:class:`~fusionzoo.training.trainer.FinetuneRecipe`) trains every task's head on its
loss; ``retrieval`` (:class:`~fusionzoo.training.retrieval.RetrievalRecipe`) trains ITC + ITM;
``multitask`` (:class:`~fusionzoo.training.multitask.MultiTaskRecipe`) trains several fine-tuning
tasks in one model (``task=vqa+captioning``). A recipe
of your own: subclass :class:`~fusionzoo.training.loop.Recipe` and decorate it with
``@fusionzoo.registry.register_recipe("name")``, then set ``recipe = "name"`` on your task.
"""

from fusionzoo.registry import RECIPES

from .multitask import MultiTaskRecipe
from .retrieval import RetrievalRecipe
from .trainer import FinetuneRecipe

RECIPES.register("finetune", FinetuneRecipe)
RECIPES.register("retrieval", RetrievalRecipe)
RECIPES.register("multitask", MultiTaskRecipe)
