"""Classifier-free guidance arithmetic, through the public modes on the golden tiny model.

With one Euler step the output latents are noise + dt * v, and the guided v is affine in the guidance:
v(g) = v_uncond + g * (v_cond - v_uncond). So the outputs at g = 2 and g = 3 determine the line, and at g = 1 it
must give the conditional pass, which the modes run without the unconditional half (guidance <= 1 turns CFG off):
out(1) = 2 * out(2) - out(3). The same holds for edit's image guidance at a fixed text guidance, where 1 is the
published two-way CFG.
"""

import torch

from tiny_models import golden_model
from unialign_core import edit, text_to_image

TOL = 1e-5


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_text_guidance_one_is_the_conditional_pass():
    def out(guidance):
        return text_to_image(
            golden_model(),
            "a red cube",
            negative_prompt="blurry",
            width=16,
            height=16,
            steps=1,
            guidance=guidance,
            seed=3,
        ).latents

    one, two, three = out(1.0), out(2.0), out(3.0)
    assert max_diff(two, one) > 1e-3  # the two prompts differ, so the check below is not 0 = 0
    assert max_diff(one, 2 * two - three) <= TOL


def test_image_guidance_one_is_the_two_way_cfg():
    source = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def out(image_guidance):
        return edit(
            golden_model(), source, "make it blue", steps=1, guidance=3.0, image_guidance=image_guidance, seed=3
        ).latents

    one, two, three = out(1.0), out(2.0), out(3.0)
    assert max_diff(two, one) > 1e-3  # the branch without the source differs, so the check is not 0 = 0
    assert max_diff(one, 2 * two - three) <= TOL
