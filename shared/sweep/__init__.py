"""Parameter sweeps: one request, its strategy run once per combination of params.

A sweep request is a *parent* backtest. The scheduler expands it (:mod:`.expand`) into
*child* backtests, ordinary requests with derived ids, and plans each as any request; the
children share the parent's tenant and sandbox session. As each child ends, :mod:`.track`
counts it for the parent; the last one builds the parent's result (:mod:`.rank`).
"""
