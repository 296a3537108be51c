"""A classifier that goes out of scope takes what running it made with it: its onnxruntime sessions, the
converted torch module, the in-graph Grad-CAM and Recipro-CAM sessions and heads. The library's caches
are kept by the classifier or weakly keyed by it; one that held on (a strong reference in a module-level
table, or a table value pointing back at its weak key) would keep every model a long process (a server,
the test suite) ever loaded."""
import gc
import weakref

import numpy as np
import pytest

import explainer
from explainer.methods.gradients import pixel_attributions
from explainer.runtime.torch_engine import torch_engine

from graphs import linear_classifier


def _small_net():
    """A small classifier (16x16 images, one conv layer "conv1") and an image for it."""
    model, _ = linear_classifier(k=4, size=(16, 16))
    net = explainer.load(model, preprocessing="none", batch_size=2)
    return net, np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _cams(net, image) -> dict:
    """Grad-CAM (in the graph) and Recipro-CAM maps of ``image``'s class 1 at conv1."""
    return {"gradcam": explainer.gradcam(net, image, 1, feature_layer="conv1"),
            "recipro_cam": explainer.recipro_cam(net, image, 1, feature_layer="conv1", verbose=False)}


def _used_and_dropped():
    """Weak references to a classifier and everything running it made, the classifier itself gone."""
    net, image = _small_net()
    net.predict(image)
    pixel_attributions(net, image, 1)
    _cams(net, image)
    made = {"classifier": net, "engine": net.ort, "torch engine": torch_engine(net),
            "torch module": torch_engine(net).pixel_model}
    made.update({f"onnxruntime session {i}": s for i, s in enumerate(net.ort._sessions.values())})
    from explainer.export import engine as in_graph
    from explainer.methods import recipro_cam

    made.update({f"in-graph session {key}": s for key, (_, s, _) in in_graph._SESSIONS.get(net, {}).items()
                 if s is not None and s is not in_graph.CLOSED})
    made.update({f"Recipro-CAM head {key}": h for key, h in recipro_cam._HEADS.get(net, {}).items()})
    made.update({f"Recipro-CAM session {key}": s for key, (_, s, *_) in recipro_cam._GRAPHS.get(net, {}).items() if s})
    assert any(k.startswith("in-graph session") for k in made) and any(k.startswith("Recipro-CAM head") for k in made)
    return {what: weakref.ref(obj) for what, obj in made.items()}


def test_a_dropped_classifier_releases_its_sessions_and_modules():
    refs = _used_and_dropped()
    gc.collect()
    alive = sorted(what for what, ref in refs.items() if ref() is not None)
    assert not alive, f"still alive after the classifier was dropped: {alive}"


def test_returning_arena_memory_keeps_the_sessions_and_their_results():
    model, _ = linear_classifier(k=4, size=(16, 16))
    net = explainer.load(model, preprocessing="none", batch_size=2)
    x = net.to_model_input(np.random.default_rng(1).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32))
    session = net.ort.session([net.output.name])
    before = net.ort.run(x, [net.output.name])[0]
    net.ort.return_memory(x[:1])  # every cached session
    net.ort.return_memory(x[:1], [net.output.name], single_thread=True)  # none cached: nothing
    assert net.ort.session([net.output.name]) is session
    np.testing.assert_array_equal(net.ort.run(x, [net.output.name])[0], before)


def test_measuring_the_batch_size_returns_the_arena_of_the_largest_candidate(auto_batch_model, record_calls):
    """'auto' tries batches up to 64 on the session it keeps: its arena, grown to the largest, is given
    back once the size is chosen (the session stays cached)."""
    from explainer.runtime import ort_engine

    net = explainer.load(auto_batch_model, preprocessing="none")
    returned = record_calls(ort_engine.OrtEngine, "return_memory",
                            lambda example, outputs=None, single_thread=False:
                            (example.shape[0], tuple(outputs), single_thread))
    net.batch_size
    net.stream_batch_size
    assert returned == [(1, (net.output.name,), False), (1, (net.output.name,), True)]
    assert len(net.ort._sessions) == 2  # both kept


def test_recipro_cams_check_sessions_close_once_the_in_graph_path_is_chosen(chelsea):
    """The in-graph Recipro-CAM path is chosen after comparing its maps with the two-stage path's, which
    opens the head's sessions and the classifier's session with the feature layer as an output: those
    are closed once the in-graph path wins (they hold their own copies of the weights), and a two-stage
    call asked for later opens them again and gives the same maps."""
    from explainer.methods import recipro_cam
    from explainer.methods.gradcam import default_feature_layer

    net = explainer.load()
    layer = net.layer(default_feature_layer(net)[0])
    assert explainer.recipro_cam_engine(net) == "in-graph"
    head = recipro_cam.head_of(net, layer)
    engines = [e for e in (head.engine, head.full_engine, head.pooled[1] if head.pooled else None) if e is not None]
    assert engines and not any(e._sessions for e in engines)
    assert all(key[0] == () for key in net.ort._sessions)  # no session with the feature layer as an output
    small = net.fit_pixels(chelsea)
    one = recipro_cam.low_resolution(net, small, layer, [285])
    two = recipro_cam.low_resolution(net, small, layer, [285], path="two-stage")
    assert any(e._sessions for e in engines)
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_in_graph_gradcam_keeps_a_bounded_number_of_sessions_open(chelsea):
    """Each layer's in-graph Grad-CAM session holds a copy of the weights: a classifier keeps at most
    ``MAX_OPEN`` of them open (the least recently used closed, its decision kept); a closed layer's map
    is computed again, equal to the first."""
    from explainer.export import engine as in_graph

    net = explainer.load()
    layers = [l.name for l in net.layers() if l.op_type == "Clip" and l.shape and len(l.shape) == 3][-(in_graph.MAX_OPEN + 2):]
    x, targets = net.to_model_input(net.fit_pixels(chelsea)[None]), np.asarray([[285]])
    first = in_graph.cam_maps(net, x, targets, feature_layer=layers[0])
    for layer in layers[1:]:
        in_graph.cam_maps(net, x, targets, feature_layer=layer)
    entries = in_graph._SESSIONS[net]
    assert all((("gradcam", layer) in entries) for layer in layers)
    assert sum(s is not None and s is not in_graph.CLOSED for _, s, _ in entries.values()) == in_graph.MAX_OPEN
    assert entries[("gradcam", layers[0])][1] is in_graph.CLOSED
    assert all(choice == "onnxruntime" for choice, _, _ in entries.values())
    again = in_graph.cam_maps(net, x, targets, feature_layer=layers[0])
    assert entries[("gradcam", layers[0])][1] is not in_graph.CLOSED
    np.testing.assert_array_equal(again, first)


def test_release_caches_gives_back_what_explaining_kept_and_the_maps_stay(record_calls):
    """``Classifier.release_caches``: the classifier's entries in every registered per-classifier cache
    (the in-graph Grad-CAM sessions, Recipro-CAM's heads and sessions) go, and so do its engine's sessions
    but the plain one, whose arena is returned; everything is made again on next use, the maps equal."""
    from explainer import registries
    from explainer.runtime.ort_engine import OrtEngine

    net, image = _small_net()
    first = _cams(net, image)
    net.ort.session([net.layer("conv1").output])  # a layer's activations, and the streams' single-threaded session
    net.ort.session(single_thread=True)
    plain = net.ort.session()
    caches = registries.classifier_caches()
    assert {"in-graph Grad-CAM sessions", "Recipro-CAM heads and in-graph sessions"} <= set(caches)
    holding = sorted(name for name, cache in caches.items() for table in cache.tables if net in table)
    assert "in-graph Grad-CAM sessions" in holding and "Recipro-CAM heads and in-graph sessions" in holding
    assert len(net.ort._sessions) >= 3
    returned = record_calls(OrtEngine, "return_memory", lambda example, *rest: example.shape)

    net.release_caches()
    still = sorted(name for name, cache in caches.items() for table in cache.tables if net in table)
    assert not still, f"entries of the classifier kept by {still}"
    assert list(net.ort._sessions) == [((), False)] and net.ort.session() is plain
    assert returned == [(1, *net.per_image_shape)]

    again = _cams(net, image)
    for name, cam in first.items():
        assert np.max(np.abs(again[name] - cam)) <= 1e-6, name
    assert all(net in caches[name].tables[0] for name in holding)  # made again


def test_a_second_classifier_cache_under_a_registered_name_is_refused(monkeypatch):
    from explainer import registries

    registered = registries.classifier_caches()
    with pytest.raises(ValueError, match=r"a classifier cache named 'in-graph Grad-CAM sessions' is already "
                                         r"registered \(explainer/export/engine\.py:\d+\); refused a second "
                                         r"one \(tests/test_release\.py:\d+\)"):
        registries.register_classifier_cache("in-graph Grad-CAM sessions", weakref.WeakKeyDictionary())
    assert registries.classifier_caches() == registered  # nothing overwritten
    monkeypatch.setattr(registries, "_CLASSIFIER_CACHES", dict(registered))  # the test's own, then
    registries.register_classifier_cache("a test's", weakref.WeakKeyDictionary())
    with pytest.raises(ValueError, match="already registered"):
        registries.register_classifier_cache("a test's", {})
    with pytest.raises(TypeError):
        registries.register_classifier_cache("a test's list", [])


def test_release_caches_drops_incremental_occlusions_split_and_its_sessions():
    """Incremental occlusion keeps the graph split on ``net.runtime.incremental_split``, with a session per
    stage and per suffix (a suffix holds most of the weights): ``release_caches`` drops it, sessions
    included; its decisions (numbers) stay, and occlusion again makes a new split with an equal map."""
    net, image = _small_net()
    options = dict(mask_size=3, stride=2, verbose=False, output_upsampling="none", batch_size=4, incremental=True)
    first = explainer.occlusion_sensitivity(net, image, 1, **options)
    split = net.runtime.incremental_split
    assert split is not None and split._suffixes and any(stage.engines for stage in split._stages.values())
    engines = list(split._suffixes.values()) + [e for s in split._stages.values() for e in s.engines.values()]
    sessions = [s for e in engines for s in e._sessions.values()]
    assert sessions
    refs = [weakref.ref(obj) for obj in [split, *engines, *sessions]]
    decisions = dict(net.runtime.incremental_decisions)
    del split, engines, sessions

    net.release_caches()
    gc.collect()
    assert net.runtime.incremental_split is None
    alive = [ref() for ref in refs if ref() is not None]
    assert not alive, f"still alive after release_caches: {alive}"
    assert net.runtime.incremental_decisions == decisions  # the decisions stay

    again = explainer.occlusion_sensitivity(net, image, 1, **options)
    assert net.runtime.incremental_split is not None  # made again
    assert np.max(np.abs(again - first)) <= 1e-6
