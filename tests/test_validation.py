"""Input that cannot work (`fromage_jax._src.validation`): a clear
`TypeError` or `ValueError` that names the leaf and the public function
called, when the optimizer is built (hyperparameters) or traced (trees),
never a crash deep in XLA or a silent NaN. The table's optimizers are checked
for the function they name in `tests/test_optimizers.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fromage_jax as fj
from fromage_jax._src import validation

# ----------------------------------- params missing, trees that do not match ---


@pytest.mark.parametrize(
    'name, make',
    [
        ('fromage', lambda: fj.fromage(0.1)),
        ('fromage', lambda: fj.fromage(0.1, p_bound=2.0)),
        ('scale_by_frobenius_ratio', fj.scale_by_frobenius_ratio),
        ('prefactor_correction', lambda: fj.prefactor_correction(0.1)),
        ('norm_clip_to_init', lambda: fj.norm_clip_to_init(2.0)),
    ],
)
def test_params_none_raises(name, make):
  tx = make()
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError) as info:
    tx.update(params, state, None)
  assert f'fromage_jax.{name}' in str(info.value)


def test_params_none_raises_fromage_on_plateau():
  tx = fj.fromage_on_plateau(0.1)
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError, match='fromage_jax.fromage_on_plateau'):
    tx.update(params, state, None, value=1.0)


_PARAMS = {'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((3,))}}


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize(
    'bad_updates, error, needle',
    [
        ({'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((4,))}}, ValueError,
         "['layer']['b']"),
        ({'layer': {'w': jnp.ones((3, 2)), 'b': jnp.ones((3,))}}, ValueError,
         "['layer']['w']"),
        ({'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((3,), jnp.complex64)}},
         TypeError, "['layer']['b']"),
        ({'layer': {'w': jnp.ones((2, 3)), 'bias': jnp.ones((3,))}},
         ValueError, "['layer']['bias']"),
        ({'layer': {'w': jnp.ones((2, 3))}}, ValueError, "['layer']['b']"),
    ],
    ids=['shape_b', 'shape_w', 'complex_for_real', 'renamed', 'missing'],
)
@pytest.mark.parametrize('p_bound', [None, 2.0])
def test_mismatch_raises_at_trace_time_naming_leaf(
    bad_updates, error, needle, jit, p_bound
):
  tx = fj.fromage(0.1, p_bound=p_bound)
  state = tx.init(_PARAMS)
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(error) as info:
    update(bad_updates, state, _PARAMS)
  msg = str(info.value)
  assert needle in msg, msg
  assert 'fromage_jax' in msg, msg


@pytest.mark.parametrize(
    'make',
    [lambda: fj.prefactor_correction(0.1), lambda: fj.norm_clip_to_init(2.0)],
)
@pytest.mark.parametrize('jit', [False, True])
def test_later_transforms_check_shapes_too(make, jit):
  tx = make()
  state = tx.init(_PARAMS)
  bad = {'layer': {'w': jnp.ones((2, 3)), 'b': jnp.ones((5,))}}
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError) as info:
    update(bad, state, _PARAMS)
  assert "['layer']['b']" in str(info.value)


# --------------------------------------------------- integer and bool leaves ---


_MAKERS = [
    lambda: fj.fromage(0.1),
    lambda: fj.fromage(0.1, p_bound=2.0),
    fj.scale_by_frobenius_ratio,
    lambda: fj.prefactor_correction(0.1),
    lambda: fj.norm_clip_to_init(2.0),
]


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize('make', _MAKERS)
def test_int_and_bool_params_raise_type_error_naming_leaf(make, dtype):
  params = {'dense': {'w': jnp.ones((2, 2))}, 'emb': {'ids': jnp.ones(3, dtype)}}
  tx = make()
  with pytest.raises(TypeError) as info:
    tx.init(params)
  assert 'ids' in str(info.value) and 'emb' in str(info.value), info.value


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.bool_])
@pytest.mark.parametrize('jit', [False, True])
def test_int_and_bool_leaves_raise_type_error_in_update(dtype, jit):
  """Even if init was skipped (state built from float params)."""
  float_params = {'emb': {'ids': jnp.ones(3)}}
  int_params = {'emb': {'ids': jnp.ones(3, dtype)}}
  for make in _MAKERS:
    tx = make()
    state = tx.init(float_params)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(TypeError) as info:
      update(int_params, state, int_params)
    assert 'ids' in str(info.value), info.value


@pytest.mark.parametrize(
    'make', [lambda: fj.prefactor_correction(0.1), lambda: fj.norm_clip_to_init(2)]
)
def test_int_updates_with_float_params_raise_type_error(make):
  params = {'emb': {'ids': jnp.ones(3)}}
  tx = make()
  with pytest.raises(TypeError) as info:
    tx.update({'emb': {'ids': jnp.ones(3, jnp.int32)}}, tx.init(params), params)
  assert 'ids' in str(info.value)


# --------------------------------------- hyperparameters, refused when built ---


_BAD_LR = [-0.1, -1e-9, float('nan'), float('inf'), -float('inf')]


_BAD_P = [0.0, -1.0, float('nan'), float('inf'), -float('inf')]


# (argument, the builders that take it, values it refuses with ValueError).
_BAD_VALUES = {
    'learning_rate': ([fj.fromage, fj.prefactor_correction,
                       fj.fromage_on_plateau], _BAD_LR),
    'p_bound': ([lambda p: fj.fromage(0.01, p_bound=p), fj.norm_clip_to_init,
                 lambda p: fj.fromage_on_plateau(0.01, p_bound=p)], _BAD_P),
    'grad_norm_floor': (
        [lambda f: fj.fromage(0.01, grad_norm_floor=f),
         lambda f: fj.fromage(0.01, p_bound=2.0, grad_norm_floor=f),
         lambda f: fj.scale_by_frobenius_ratio(grad_norm_floor=f),
         lambda f: fj.fromage_on_plateau(0.01, grad_norm_floor=f)], _BAD_LR),
}


@pytest.mark.parametrize(
    'arg,make,value',
    [pytest.param(arg, make, value, id=f'{arg}-{i}-{value}')
     for arg, (makers, values) in _BAD_VALUES.items()
     for i, make in enumerate(makers) for value in values])
def test_bad_hyperparameter_value_raises_at_construction(arg, make, value):
  with pytest.raises(ValueError, match=arg):
    make(value)


_NOT_NUMBERS = [None, '0.01', True, [0.01], 1j]


@pytest.mark.parametrize('value', _NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize(
    'make',
    [
        lambda v: fj.fromage(v),
        lambda v: fj.prefactor_correction(v),
        lambda v: fj.fromage_on_plateau(v),
        lambda v: fj.fromage(0.01, p_bound=v if v is not None else 'x'),
        lambda v: fj.norm_clip_to_init(v),
        lambda v: fj.fromage_on_plateau(0.01, factor=v),
        lambda v: fj.scale_by_frobenius_ratio(grad_norm_floor=v),
    ],
    ids=['fromage', 'prefactor_correction', 'fromage_on_plateau',
         'fromage_p_bound', 'norm_clip_to_init', 'plateau_factor',
         'grad_norm_floor'],
)
def test_hyperparameter_of_wrong_type_raises_type_error_when_built(make, value):
  with pytest.raises(TypeError,
                     match='learning_rate|p_bound|factor|grad_norm_floor'):
    make(value)


def test_non_scalar_learning_rate_raises_value_error_when_built():
  with pytest.raises(ValueError, match='learning_rate'):
    fj.fromage(jnp.array([0.01, 0.02]))


@pytest.mark.parametrize(
    'kwargs, error',
    [
        (dict(factor=0.0), ValueError), (dict(factor=1.0), ValueError),
        (dict(patience=-1), ValueError), (dict(patience=2.5), TypeError),
        (dict(cooldown=-1), ValueError), (dict(accumulation_size=0), ValueError),
        (dict(rtol=-1e-4), ValueError), (dict(atol=float('nan')), ValueError),
        (dict(min_scale=2.0), ValueError),
    ],
    ids=repr,
)
def test_bad_plateau_settings_raise_when_built(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    fj.fromage_on_plateau(0.01, **kwargs)


def test_good_hyperparameters_of_other_number_types_are_accepted():
  for lr in (0, 1, np.float32(0.01), jnp.asarray(0.01), np.int64(1)):
    fj.fromage(lr)
  fj.fromage(0.01, p_bound=np.float64(2.0))
  fj.fromage_on_plateau(0.01, patience=np.int32(3), factor=np.float32(0.5))


# ----------------------------------------------------- one rule for integers ---


@pytest.mark.parametrize('value', [3, np.int8(3), np.int64(3)],
                         ids=repr)
def test_python_and_numpy_ints_are_integers(value):
  assert validation.is_integer(value)


@pytest.mark.parametrize('value', [True, np.bool_(True), 3.0, '3', None],
                         ids=repr)
def test_bools_floats_and_others_are_not(value):
  assert not validation.is_integer(value)


def test_the_same_integers_serve_every_entry_point():
  params = {'blocks': jnp.ones((2, 3, 3))}
  for axis in (0, np.int64(0)):
    stacked = fj.stacked_layer_axes('blocks', axis=axis)(params)
    direct = fj.fromage(0.1, layer_axes=(axis,))
    assert stacked == {'blocks': (0,)}
    direct.update(params, direct.init(params), params)
  fj.fromage_on_plateau(0.1, patience=np.int64(3), cooldown=np.int8(1))
  with pytest.raises(TypeError, match='fromage_jax.stacked_layer_axes'):
    fj.stacked_layer_axes('blocks', axis=True)
  with pytest.raises(TypeError, match='fromage_jax.fromage_on_plateau'):
    fj.fromage_on_plateau(0.1, patience=True)
