//! The web applications, embedded in the binary: built from `web/` by `npm run build`
//! into `gateway/assets/web/` (committed, so a plain `cargo build` needs no npm).

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const WORKSTATION_HTML: &str = include_str!("../assets/web/workstation.html");
const WORKSTATION_JS: &str = include_str!("../assets/web/workstation.js");
const WORKSTATION_CSS: &str = include_str!("../assets/web/workstation.css");
const WIDGET_JS: &str = include_str!("../assets/web/widget.js");
const WIDGET_DEMO_HTML: &str = include_str!("../assets/web/widget-demo.html");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `/` is a demo page embedding the widget with one script tag; `/widget.js` is what
/// any site embeds.
pub(crate) fn public<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", WIDGET_DEMO_HTML) }))
        .route("/widget.js", get(|| async { file("text/javascript; charset=utf-8", WIDGET_JS) }))
}

/// The operator workstation, supervisor console and admin screens.
pub(crate) fn private<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file("text/html; charset=utf-8", WORKSTATION_HTML) }))
        .route("/workstation.js", get(|| async { file("text/javascript; charset=utf-8", WORKSTATION_JS) }))
        .route("/workstation.css", get(|| async { file("text/css; charset=utf-8", WORKSTATION_CSS) }))
}
