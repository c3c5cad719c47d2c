"""The edit debugger in the browser (``/ui``): the page (``static/``: HTML, CSS and JavaScript, no CDN;
`page`: its files, CSP and routes), the endpoints it reads beyond the public API (`routes`), their
computations (`data`: candidates with why-nots, neighbours, the 2-D scope map) and reply models
(`schemas`), an eval run's audit (`audit`: the run directory read once; `audit_routes`: ``GET /audit``,
``GET /audit/images/{sha}`` and the audit-only app) and ``esg-memory ui`` (`cli`: a memory directory
and/or an eval run opened read-only on 127.0.0.1). Nothing is imported here: ``esg-memory --help`` must
not need FastAPI."""
