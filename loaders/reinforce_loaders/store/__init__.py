"""The reinforced store's layout in code, one module per concern; users import it through
:mod:`reinforce_loaders.format`.

* :mod:`.spec`: the names, dtypes, constants and limits of format_spec.md.
* :mod:`.header`: :class:`~.header.StoreHeader` and its checks, the record layout, format versions, array specs.
* :mod:`.records`: record encoding and decoding, class vocabularies, quantization, record checks.
* :mod:`.derived`: derived parameter columns (``param_storage = "derived"``) and their digests.
* :mod:`.bounded`: compressors that refuse a decompression bomb.
* :mod:`.remote`: range reads over HTTP(S).
* :mod:`.arrays`: opening a store, reading its header and arrays, the checks before reading.

Each imports only the ones listed before it (``arrays`` excepted, which imports all of them).
"""
