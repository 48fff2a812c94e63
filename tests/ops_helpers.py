"""Shared inputs and a naive per-point reference for the multi-scale deformable attention tests."""
import torch


def level_layout(level_shapes, device="cpu"):
    """(spatial_shapes, level_start_index, total length) for a list of (H, W)."""
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.long, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def make_inputs(batch=2, n_queries=5, n_heads=2, head_dim=3, level_shapes=((4, 5), (3, 2)), n_points=3,
                dtype=torch.float64, device="cpu", seed=0, location_range=(-0.2, 1.2)):
    """Random attention inputs; sampling locations spread past the map on every side."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, total_len = level_layout(level_shapes, device)
    n_levels = len(level_shapes)
    value = torch.randn(batch, total_len, n_heads, head_dim, generator=generator, dtype=torch.float64)
    low, high = location_range
    locations = low + (high - low) * torch.rand(
        batch, n_queries, n_heads, n_levels, n_points, 2, generator=generator, dtype=torch.float64)
    logits = torch.randn(batch, n_queries, n_heads, n_levels * n_points, generator=generator, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, n_queries, n_heads, n_levels, n_points)
    return (value.to(device, dtype), spatial_shapes, level_start_index,
            locations.to(device, dtype), weights.to(device, dtype))


def set_border_locations(locations, level_shapes):
    """Overwrite the first query's points with exact borders, pixel centers and far-outside points."""
    # Per level, candidates in pixel units of x (and y): the -1 / size edge where only one corner
    # is inside, the image border 0, the first pixel center, the last center, the far border, outside.
    for level, (height, width) in enumerate(level_shapes):
        xs = [-0.5 / width, 0.0, 0.5 / width, 1.0 - 0.5 / width, 1.0, 1.0 + 0.5 / width, -3.0, 7.0]
        ys = [0.0, -0.5 / height, 1.0, 0.5 / height, 1.0 + 0.5 / height, 1.0 - 0.5 / height, 0.5, -2.0]
        flat = locations[:, 0, :, level].reshape(-1, 2)
        for i in range(flat.shape[0]):
            flat[i, 0] = xs[i % len(xs)]
            flat[i, 1] = ys[(i // len(xs) + i) % len(ys)]
        locations[:, 0, :, level] = flat.view_as(locations[:, 0, :, level])
    return locations


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Point by point bilinear sampling with zero padding, pixel centers at (i + 0.5) / size."""
    batch, _, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    value = value.double().cpu()
    locations = sampling_locations.double().cpu()
    weights = attention_weights.double().cpu()
    output = torch.zeros(batch, n_queries, n_heads, head_dim, dtype=torch.float64)
    for level in range(n_levels):
        height, width = (int(v) for v in spatial_shapes[level])
        start = int(level_start_index[level])
        for n in range(batch):
            for q in range(n_queries):
                for m in range(n_heads):
                    for p in range(n_points):
                        x = float(locations[n, q, m, level, p, 0]) * width - 0.5
                        y = float(locations[n, q, m, level, p, 1]) * height - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(head_dim, dtype=torch.float64)
                        for cy, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
                            for cx, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
                                if 0 <= cy < height and 0 <= cx < width:
                                    sample += wy * wx * value[n, start + cy * width + cx, m]
                        output[n, q, m] += weights[n, q, m, level, p] * sample
    return output.view(batch, n_queries, n_heads * head_dim)
