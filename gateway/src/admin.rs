//! The gateway's own admin routes: `/debug/catalog` and `/debug/peers`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde::Serialize;

use crate::pool::PeerStatus;
use crate::shared::Shared;

#[derive(Serialize)]
struct Ejected {
    site: String,
    remaining_ms: u64,
}

#[derive(Serialize)]
struct Peers {
    site: String,
    links: Vec<PeerStatus>,
    ejected: Vec<Ejected>,
    streams_in_flight: usize,
    draining: bool,
}

pub fn debug_routes(sh: Arc<Shared>) -> Router {
    let for_catalog = sh.clone();
    Router::new()
        .route(
            "/debug/catalog",
            get(move || {
                let sh = for_catalog.clone();
                async move { Json((*sh.catalog()).clone()) }
            }),
        )
        .route(
            "/debug/peers",
            get(move || {
                let sh = sh.clone();
                async move {
                    Json(Peers {
                        site: sh.site.clone(),
                        links: sh.pool.status(),
                        ejected: sh
                            .ejected_sites()
                            .into_iter()
                            .map(|(site, d)| Ejected {
                                site,
                                remaining_ms: d.as_millis() as u64,
                            })
                            .collect(),
                        streams_in_flight: sh.drain.inflight(),
                        draining: sh.drain.is_draining(),
                    })
                }
            }),
        )
}
