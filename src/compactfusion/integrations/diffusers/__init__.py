"""The diffusers integration: plans (where tokens are split and gathered), attention routing, steps and branches."""
