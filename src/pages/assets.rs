//! Static assets, compiled into the binary so `haven serve` is the whole app.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Name, content type and contents of every asset.
const ASSETS: [(&str, &str, &str); 11] = [
    ("app.css", "text/css; charset=utf-8", include_str!("../../assets/app.css")),
    ("home.js", "text/javascript; charset=utf-8", include_str!("../../assets/home.js")),
    ("chat.js", "text/javascript; charset=utf-8", include_str!("../../assets/chat.js")),
    ("alert.js", "text/javascript; charset=utf-8", include_str!("../../assets/alert.js")),
    ("dashboard.js", "text/javascript; charset=utf-8", include_str!("../../assets/dashboard.js")),
    ("session.js", "text/javascript; charset=utf-8", include_str!("../../assets/session.js")),
    ("icon.svg", "image/svg+xml", include_str!("../../assets/icon.svg")),
    // The chat page's icon while something new waits in a background tab.
    ("icon-unread.svg", "image/svg+xml", include_str!("../../assets/icon-unread.svg")),
    // The API reference (`/api/docs`): Swagger UI, vendored unchanged
    // (assets/vendor/swagger-ui/README.md), and the script that starts it.
    ("api-docs.js", "text/javascript; charset=utf-8", include_str!("../../assets/api-docs.js")),
    (
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/vendor/swagger-ui/swagger-ui-bundle.js"),
    ),
    (
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/vendor/swagger-ui/swagger-ui.css"),
    ),
];

/// A static asset.
///
/// The pages' scripts, styles and icons, and the API reference's.
#[utoipa::path(
    get,
    path = "/assets/{file}",
    tag = "pages",
    params(("file" = String, Path, description = "The file's name, e.g. `app.css`")),
    responses(
        (status = 200, description = "The file (`Cache-Control: no-cache`).",
            content((String = "text/css"), (String = "text/javascript"), (String = "image/svg+xml"))),
        (status = 404, description = "No such asset.", body = String, content_type = "text/html"),
    )
)]
pub async fn serve(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *body)
                .into_response()
        }
        None => super::not_found_page(),
    }
}
