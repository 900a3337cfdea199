from reinforce_loaders import ReinforcedDataset


def test_store_replays(digits, store):
    ds = ReinforcedDataset(digits[0], store)
    image, target = ds[0]
    assert image.shape == (3, 32, 32)
    assert abs(float(target.sum()) - 1.0) < 1e-5
