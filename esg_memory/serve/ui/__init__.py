"""The edit debugger in the browser (``/ui``): the page (``static/``: HTML, CSS and JavaScript, no CDN), the
endpoints it reads beyond the public API (`routes`), their computations (`data`: candidates with why-nots,
neighbours, the 2-D scope map) and reply models (`schemas`), and ``esg-memory ui`` (`cli`: a memory directory
opened read-only on 127.0.0.1). Nothing is imported here: ``esg-memory --help`` must not need FastAPI."""
