"""Skeleton scores of a segmentation: expected run length (ERL), merges, splits, omissions.

Pure numpy and scipy. The ground truth is a list of ``Skeleton``s (one per ground-truth object: node
coordinates ``vertices_zyx`` in physical units and ``edges`` between node indices; kimimaro's, see
``ffn_jax.skeletons``, or given by hand); the segmentation enters only as the predicted ID at
each node (``node_segments``, the voxel under the node; ID 0 = unlabelled).

Definitions, with edge length = Euclidean distance of its two nodes and L = the total length of
all skeletons' edges (``skeleton_length``):

- A segment *holds* a skeleton when at least ``min_nodes`` of the skeleton's nodes lie in it.
- A **merge** is a non-zero predicted segment that holds two or more skeletons;
  ``merges`` counts those segments.
- ``splits`` = sum over skeletons of max(0, number of distinct non-zero segments that hold it
  - 1).
- An edge of skeleton s is *in* segment p when both its nodes lie in p (p non-zero). A **run**
  is a connected piece of s made of edges in one segment p: the connected components of s's
  edges in p, so an unlabelled (0) node or a node of another segment between two pieces breaks
  them into two runs (funlib's ``expected_run_length`` instead sums all of s's edges in p into
  one). Runs of a merge segment have length 0; an edge whose nodes lie in two segments, or at an
  unlabelled node, belongs to no run.
- ``erl`` = sum over runs of run_length^2 / L: the expected length of the run that contains a
  point drawn uniformly from all skeletons (a point on an edge in no run scores 0).
  ``erl_max`` = sum over skeletons of L_s^2 / L, what a perfect segmentation reaches.
  ``erl_voxels`` is ``erl`` with edge lengths measured in voxels (node coordinates divided by
  the voxel size).
- ``omitted`` = the share of L at unlabelled nodes: each node carries half the length of each of
  its edges.

With no skeleton edge at all (L = 0) the length-based scores are None.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from ffn_jax.errors import UserError

DEFAULT_MIN_NODES = 5


@dataclasses.dataclass(frozen=True)
class Skeleton:
  """One ground-truth object's skeleton.

  Attributes:
    label: the object's ground-truth ID.
    vertices_zyx: float [N, 3] node coordinates in physical units (voxel index x voxel size).
    edges: int [E, 2] pairs of node indices.
  """
  label: int
  vertices_zyx: np.ndarray
  edges: np.ndarray


def node_segments(seg: np.ndarray, skeletons: Sequence[Skeleton], voxel_size_zyx) -> list:
  """The predicted ID under every node of every skeleton (the nearest voxel), one array each.

  Raises:
    UserError: a node lies outside ``seg`` (skeletons of another box or voxel size).
  """
  voxel_size = check_voxel_size(voxel_size_zyx)
  shape = np.asarray(seg.shape)
  out = []
  for s in skeletons:
    index_N3 = np.rint(np.asarray(s.vertices_zyx, np.float64) / voxel_size).astype(np.int64)
    if len(index_N3) and (np.any(index_N3 < 0) or np.any(index_N3 >= shape)):
      raise UserError(f"skeleton {s.label} has nodes outside the segmentation of shape "
                      f"{tuple(shape.tolist())} (zyx): skeletons of another box or voxel size?")
    out.append(seg[tuple(index_N3.T)])
  return out


def skeleton_metrics(skeletons: Sequence[Skeleton], segments: Sequence[np.ndarray],
                     voxel_size_zyx=(1, 1, 1), min_nodes: int = DEFAULT_MIN_NODES) -> dict:
  """ERL, merges, splits and omissions (see the module docstring).

  Args:
    skeletons: the ground truth.
    segments: per skeleton, the predicted ID of each of its nodes (``node_segments``).
    voxel_size_zyx: physical size of a voxel, for ``erl_voxels``.
    min_nodes: nodes a segment needs on a skeleton to hold it.
  Returns:
    dict with erl, erl_voxels, erl_max, skeleton_length (physical units), merges, splits,
    omitted, skeletons (their number) and skeleton_min_nodes.
  """
  if not (isinstance(min_nodes, (int, np.integer)) and min_nodes >= 1):
    raise UserError(f"min_nodes must be an integer >= 1, got {min_nodes!r}")
  if len(segments) != len(skeletons):
    raise UserError(f"{len(segments)} node-segment arrays for {len(skeletons)} skeletons")
  n = len(skeletons)
  node_skel, node_seg, edge_nodes, edge_a, edge_b, length, length_vox = _flatten(
      skeletons, segments, check_voxel_size(voxel_size_zyx))

  # Which segments hold which skeletons: merges and splits.
  labelled = node_seg != 0
  pairs_P2, nodes_P = np.unique(np.stack([node_skel[labelled], node_seg[labelled]], 1), axis=0,
                                return_counts=True)
  held_P2 = pairs_P2.reshape(-1, 2)[nodes_P >= min_nodes]
  held_segs, skeletons_held = np.unique(held_P2[:, 1], return_counts=True)
  merged = held_segs[skeletons_held >= 2]
  splits = int(np.sum(np.maximum(np.bincount(held_P2[:, 0], minlength=n) - 1, 0)))

  total = float(length.sum())
  result = {"erl": None, "erl_voxels": None, "erl_max": None, "skeleton_length": total,
            "merges": int(len(merged)), "splits": splits, "omitted": None, "skeletons": n,
            "skeleton_min_nodes": int(min_nodes)}
  if total <= 0:
    return result
  in_run = (edge_a == edge_b) & (edge_a != 0) & ~np.isin(edge_a, merged)
  run_of_edge = _components(len(node_seg), edge_nodes[in_run])[edge_nodes[in_run, 0]]
  result["erl"] = float(np.sum(np.bincount(run_of_edge, length[in_run]) ** 2)) / total
  result["erl_voxels"] = (float(np.sum(np.bincount(run_of_edge, length_vox[in_run]) ** 2))
                         / float(length_vox.sum()))
  skeleton_lengths = np.bincount(node_skel[edge_nodes[:, 0]], length, minlength=n)
  result["erl_max"] = float(np.sum(skeleton_lengths ** 2)) / total
  result["omitted"] = float(np.sum(length * ((edge_a == 0).astype(float) + (edge_b == 0)))
                            / 2 / total)
  return result


def _flatten(skeletons, segments, voxel_size):
  """All skeletons' nodes and edges as flat arrays: per node (skeleton index, segment); per edge
  (its two nodes' indices among all nodes, their segments, length, length in voxels)."""
  # Segment IDs stay integers (uint64 IDs wrap to int64 one to one, 0 stays 0); lengths float.
  nodes, edge_ids, edge_lengths = [np.zeros((0, 2), np.int64)], [np.zeros((0, 4), np.int64)], [
      np.zeros((0, 2))]
  for i, (s, seg_N) in enumerate(zip(skeletons, segments)):
    vertices_N3 = np.asarray(s.vertices_zyx, np.float64).reshape(-1, 3)
    edges_E2 = np.asarray(s.edges, np.int64).reshape(-1, 2)
    seg_N = np.asarray(seg_N).astype(np.int64).ravel()
    if len(seg_N) != len(vertices_N3):
      raise UserError(f"skeleton {s.label}: {len(seg_N)} node segments for "
                      f"{len(vertices_N3)} nodes")
    if edges_E2.size and (edges_E2.min() < 0 or edges_E2.max() >= len(vertices_N3)):
      raise UserError(f"skeleton {s.label} has edges to nodes it does not have")
    delta_E3 = vertices_N3[edges_E2[:, 0]] - vertices_N3[edges_E2[:, 1]]
    first = sum(len(a) for a in nodes)  # this skeleton's first node among all nodes
    nodes.append(np.stack([np.full(len(seg_N), i), seg_N], 1))
    edge_ids.append(np.concatenate([edges_E2 + first, seg_N[edges_E2]], 1))
    edge_lengths.append(np.stack([np.linalg.norm(delta_E3, axis=1),
                                  np.linalg.norm(delta_E3 / voxel_size, axis=1)], 1))
  nodes_N2, ids_E4, lengths_E2 = (np.concatenate(nodes), np.concatenate(edge_ids),
                                  np.concatenate(edge_lengths))
  return (nodes_N2[:, 0], nodes_N2[:, 1], ids_E4[:, :2], ids_E4[:, 2], ids_E4[:, 3],
          lengths_E2[:, 0], lengths_E2[:, 1])


def _components(n_nodes: int, edges_E2: np.ndarray) -> np.ndarray:
  """Connected component of each of ``n_nodes`` nodes under the undirected ``edges_E2``."""
  graph = sparse.coo_matrix((np.ones(len(edges_E2)), (edges_E2[:, 0], edges_E2[:, 1])),
                            shape=(n_nodes, n_nodes))
  return csgraph.connected_components(graph, directed=False)[1]


def evaluate_skeletons(seg: np.ndarray, skeletons: Sequence[Skeleton], voxel_size_zyx=(1, 1, 1),
                       min_nodes: int = DEFAULT_MIN_NODES) -> dict:
  """``skeleton_metrics`` of segmentation ``seg`` (the box the skeletons were made in)."""
  return skeleton_metrics(skeletons, node_segments(seg, skeletons, voxel_size_zyx),
                          voxel_size_zyx, min_nodes)


def check_voxel_size(voxel_size_zyx) -> np.ndarray:
  """``voxel_size_zyx`` as float64 [3]; raises UserError unless three positive numbers."""
  size = np.asarray(voxel_size_zyx, np.float64).ravel()
  if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
    raise UserError(f"voxel size must be three positive numbers Z,Y,X, got {voxel_size_zyx!r}")
  return size
