"""The training methods, one module each, registered by name (see `..recipe`). A new method is
a module here with a `@register`ed `Recipe`, and its import below."""

from transferdesk.training.recipes import contrastive, finetune, joint, self_training, source, warm_start

# Imported for their registration: each module registers its method.
BUILT_IN = (contrastive, finetune, joint, self_training, source, warm_start)
