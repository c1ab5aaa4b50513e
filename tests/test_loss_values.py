"""The losses of train/losses.py on inputs small enough to work out by hand: each expected number is written out
as arithmetic here, never computed by the code under test."""

import math

import pytest
import torch

from train.losses import Reducer, align_loss, contrastive_loss, image_flow_loss

ONE = Reducer()  # one process


def close(value, expected):
    assert value.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# image_flow_loss: per sample the mean squared error, averaged over the samples with weight

X0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
NOISE = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
VELOCITY = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
SIGMAS = torch.tensor([0.5, 1.0])


def test_image_flow_loss_x0_target_by_hand():
    # sample 0, sigma 0.5: x_t = 0.5 * [1, 0] + 0.5 * [0, 2] = [0.5, 1]; pred x0 = x_t - 0.5 * [0, 0] = [0.5, 1]
    sample0 = ((0.5 - 1) ** 2 + (1 - 0) ** 2) / 2  # 0.625
    # sample 1, sigma 1: x_t = [1, 1]; pred x0 = [1, 1] - 1 * [1, 0] = [0, 1]
    sample1 = ((0 - 0) ** 2 + (1 - 0) ** 2) / 2  # 0.5
    both = image_flow_loss(VELOCITY, X0, NOISE, SIGMAS, torch.tensor([1.0, 1.0]), ONE)
    close(both, (sample0 + sample1) / 2)  # 0.5625
    only_first = image_flow_loss(VELOCITY, X0, NOISE, SIGMAS, torch.tensor([1.0, 0.0]), ONE)
    close(only_first, sample0)


def test_image_flow_loss_velocity_target_by_hand():
    # target noise - x0: sample 0 [-1, 2] against v [0, 0]; sample 1 [1, 1] against v [1, 0]
    sample0 = ((0 - -1) ** 2 + (0 - 2) ** 2) / 2  # 2.5
    sample1 = ((1 - 1) ** 2 + (0 - 1) ** 2) / 2  # 0.5
    both = image_flow_loss(VELOCITY, X0, NOISE, SIGMAS, torch.tensor([1.0, 1.0]), ONE, target="velocity")
    close(both, (sample0 + sample1) / 2)  # 1.5
    only_second = image_flow_loss(VELOCITY, X0, NOISE, SIGMAS, torch.tensor([0.0, 1.0]), ONE, target="velocity")
    close(only_second, sample1)


def test_image_flow_loss_divides_by_the_global_count_over_processes():
    # this process holds both samples (weights 1, 1); all processes together hold 6 weighted samples on 2
    # processes: the divisor is 6 / 2 = 3, so the local sum 0.625 + 0.5 is divided by 3
    two = Reducer(all_sum=lambda x: x * 3, world=2)
    loss = image_flow_loss(VELOCITY, X0, NOISE, SIGMAS, torch.tensor([1.0, 1.0]), two)
    close(loss, (0.625 + 0.5) / 3)


# ---------------------------------------------------------------------------------------------------------------
# align_loss: 1 - cos, averaged over the valid samples

PROJECTED = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
TEACHER = torch.tensor([[2.0, 0.0], [0.0, 3.0], [4.0, 3.0]])


def test_align_loss_by_hand():
    row0 = 1 - (1 * 2 + 0 * 0) / (1 * 2)  # same direction: 0
    row1 = 1 - (1 * 0 + 0 * 3) / (1 * 3)  # orthogonal: 1
    row2 = 1 - (3 * 4 + 4 * 3) / (5 * 5)  # cos 24/25: 0.04
    close(align_loss(PROJECTED, TEACHER, torch.tensor([1.0, 1.0, 1.0]), ONE), (row0 + row1 + row2) / 3)
    close(align_loss(PROJECTED, TEACHER, torch.tensor([1.0, 0.0, 1.0]), ONE), (row0 + row2) / 2)
    close(align_loss(-PROJECTED, TEACHER, torch.tensor([1.0, 0.0, 0.0]), ONE), 1 - -1)  # opposite: 2


# ---------------------------------------------------------------------------------------------------------------
# contrastive_loss: symmetric InfoNCE between the mean-pooled, normalised image and text states

# sample 0: image tokens [2, 0], [0, 0] -> mean [1, 0] -> unit [1, 0]; text [1, 0] -> [1, 0]
# sample 1: image tokens [0, 1], [0, 3] -> mean [0, 2] -> unit [0, 1]; text [3, 4] -> [0.6, 0.8]
# sample 2 (invalid in the tests): anything
IMAGE = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]], [[5.0, -1.0], [2.0, 2.0]]])
TEXT = torch.tensor([[[1.0, 0.0]], [[3.0, 4.0]], [[-1.0, 7.0]]])
VALID = torch.tensor([True, True, False])


def infonce_by_hand(temperature):
    # cosine similarities: image 0 . text 0 = 1, image 0 . text 1 = 0.6, image 1 . text 0 = 0, image 1 . text 1 = 0.8
    logits = [[1 / temperature, 0.6 / temperature], [0 / temperature, 0.8 / temperature]]
    # cross-entropy of a row with its diagonal entry as the label: -log(e^own / (e^own + e^other))
    image_to_text = [
        -math.log(math.exp(logits[0][0]) / (math.exp(logits[0][0]) + math.exp(logits[0][1]))),
        -math.log(math.exp(logits[1][1]) / (math.exp(logits[1][0]) + math.exp(logits[1][1]))),
    ]
    text_to_image = [
        -math.log(math.exp(logits[0][0]) / (math.exp(logits[0][0]) + math.exp(logits[1][0]))),
        -math.log(math.exp(logits[1][1]) / (math.exp(logits[0][1]) + math.exp(logits[1][1]))),
    ]
    return (sum(image_to_text) / 2 + sum(text_to_image) / 2) / 2


def test_infonce_by_hand_in_closed_form():
    # at temperature 0.5 the four terms are log(1 + e^-0.8), log(1 + e^-1.6), log(1 + e^-2), log(1 + e^-0.4)
    closed = (
        math.log(1 + math.exp(-0.8))
        + math.log(1 + math.exp(-1.6))
        + math.log(1 + math.exp(-2))
        + math.log(1 + math.exp(-0.4))
    ) / 4
    assert infonce_by_hand(0.5) == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 0.07])
def test_contrastive_loss_by_hand(temperature):
    close(contrastive_loss(IMAGE, TEXT, VALID, temperature, ONE), infonce_by_hand(temperature))


def test_contrastive_loss_with_one_valid_pair_is_zero():
    loss = contrastive_loss(IMAGE, TEXT, torch.tensor([True, False, False]), 0.5, ONE)
    assert loss.item() == 0.0


def test_contrastive_loss_over_two_processes_is_the_global_batch_times_world():
    # this process (rank 0) holds image [2, 0] and text [1, 0] (unit [1, 0] both); the other process's image and
    # text both have unit [0, 1]. At temperature 0.5 the gathered logits are [[2, 0], [0, 2]], so each of the four
    # cross-entropies is -log(e^2 / (e^2 + e^0)), and the loss is multiplied by the 2 processes
    def gather(x):  # what the other process contributes: its unit row, or its valid flag
        return torch.cat([x, torch.tensor([[0.0, 1.0]]) if x.ndim == 2 else torch.ones(1)])

    two = Reducer(gather=gather, rank=0, world=2)
    loss = contrastive_loss(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[1.0, 0.0]]]), torch.tensor([True]), 0.5, two)
    close(loss, 2 * -math.log(math.exp(2) / (math.exp(2) + math.exp(0))))
