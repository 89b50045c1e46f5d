"""The shipped stage recipes (tiny/, paper/): this folder is installed as the package `evev2.recipes`, so that
`evev2 demo`, `evev2 ablate` and `evev2 train --recipe tiny/stage1` find them wherever evev2 is installed (see
`evev2.train.recipe.shipped_recipes`). Copy a recipe to change it; this file only makes the folder importable.
"""
