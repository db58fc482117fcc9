//! The admin API's OpenAPI 3.1 document, generated from the shared types of [`super::api`].
//!
//! The functions below are not called: each one describes one operation (method, path,
//! parameters, body, responses) for the generator. A test checks that every path and method
//! they describe is one [`super::api::route`] serves, and that the document served equals
//! the one kept in the repository at `src/admin/openapi.json` (regenerate it with
//! `KEYWARD_WRITE_OPENAPI=1 cargo test --lib admin::openapi`).
#![allow(dead_code)]

use utoipa::OpenApi;

use super::api::audit::{AuditExport, AuditQuery, AuditRow, VerifyReport};
use super::api::clients::{Client, ClientCreated, ClientFilter, ClientRevoked, NewClient};
use super::api::credentials::{
    CredentialCreated, CredentialDeleted, CredentialFilter, CredentialRevoked, CredentialRotated,
    CredentialTested, CredentialVersion, NewCredential, RevokeCredential, RotateCredential,
    TestCredential,
};
use super::api::governance::{Budget, Limit, NewBudget, NewLimit, RuleDeleted, RuleFilter};
use super::api::system::{
    Bundle, ExportBundle, Price, PriceFilter, Reloaded, SpendBy, SpendFilter, SpendRow, Status,
};
use super::api::tenants::{NewTenant, Tenant};
use super::api::{ErrorBody, ErrorDetail};

/// The document's root.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "keyward admin API",
        description = "The admin socket of keyward: HTTP/1.1 with JSON over a Unix socket \
                       (mode 0600; peers accepted: root and the daemon's own uid). Secrets \
                       travel only in request bodies; no response returns one. Errors have \
                       the body {\"error\":{\"type\":\"keyward.<code>\",\"message\":...}} and \
                       the header keyward-error: <code>.",
        license(name = "keyward"),
    ),
    servers((url = "http://keyward", description = "curl --unix-socket $KEYWARD_HOME/admin.sock")),
    paths(
        status, metrics, reload, openapi_json,
        list_tenants, create_tenant,
        list_credentials, create_credential, rotate_credential, revoke_credential,
        delete_credential, test_credential,
        list_clients, create_client, revoke_client,
        audit_events, audit_search, audit_verify, audit_lifecycle, audit_export,
        export_bundle, spend, prices,
        list_budgets, set_budget, delete_budget, list_limits, set_limit, delete_limit,
    ),
    components(schemas(ErrorBody, ErrorDetail, SpendBy)),
    tags(
        (name = "daemon", description = "Status, metrics, reload, bundles, spend and prices."),
        (name = "tenants"), (name = "credentials"), (name = "clients"), (name = "audit"),
        (name = "governance", description = "Spend budgets and rate limits."),
    )
)]
pub struct AdminApi;

/// The document as served at `GET /v1/openapi.json`: pretty JSON with a trailing newline.
pub fn document() -> String {
    let mut text = AdminApi::openapi()
        .to_pretty_json()
        .expect("the document serializes");
    text.push('\n');
    text
}

#[utoipa::path(get, path = "/v1/status", tag = "daemon",
    responses((status = 200, description = "The daemon's status", body = Status)))]
fn status() {}

#[utoipa::path(get, path = "/v1/metrics", tag = "daemon",
    responses((status = 200, description = "Prometheus text exposition (what /metrics serves)",
        body = String, content_type = "text/plain")))]
fn metrics() {}

#[utoipa::path(post, path = "/v1/reload", tag = "daemon",
    responses(
        (status = 200, description = "The config file was re-read", body = Reloaded),
        (status = 400, description = "The file is invalid; nothing changed", body = ErrorBody),
    ))]
fn reload() {}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "daemon",
    responses((status = 200, description = "This document", body = Object)))]
fn openapi_json() {}

#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, description = "Tenants by name", body = Vec<Tenant>)))]
fn list_tenants() {}

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = NewTenant,
    responses(
        (status = 201, description = "Created", body = Tenant),
        (status = 400, description = "Invalid name or policy", body = ErrorBody),
        (status = 409, description = "The name is taken, or this keyward serves a bundle",
            body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn create_tenant() {}

#[utoipa::path(get, path = "/v1/credentials", tag = "credentials", params(CredentialFilter),
    responses(
        (status = 200, description = "Every version of every credential, newest version first",
            body = Vec<CredentialVersion>),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
fn list_credentials() {}

#[utoipa::path(post, path = "/v1/credentials", tag = "credentials", request_body = NewCredential,
    responses(
        (status = 201, description = "Created; only the masked preview of the key is returned",
            body = CredentialCreated),
        (status = 400, description = "Invalid name, scope, target or key", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "The name is taken, or this keyward serves a bundle",
            body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn create_credential() {}

#[utoipa::path(post, path = "/v1/credentials/{id}/rotate", tag = "credentials",
    params(("id" = String, Path, description = "Credential id")), request_body = RotateCredential,
    responses(
        (status = 200, description = "The new version is current; the previous ones overlap",
            body = CredentialRotated),
        (status = 400, description = "Invalid key", body = ErrorBody),
        (status = 404, description = "No such credential", body = ErrorBody),
        (status = 409, description = "The credential is revoked, or this keyward serves a bundle",
            body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn rotate_credential() {}

#[utoipa::path(post, path = "/v1/credentials/{id}/revoke", tag = "credentials",
    params(("id" = String, Path, description = "Credential id")),
    request_body = Option<RevokeCredential>,
    responses(
        (status = 200, description = "Revoked at once", body = CredentialRevoked),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 404, description = "No such credential or version", body = ErrorBody),
        (status = 409, description = "Nothing left to revoke, or this keyward serves a bundle",
            body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn revoke_credential() {}

#[utoipa::path(delete, path = "/v1/credentials/{id}", tag = "credentials",
    params(("id" = String, Path, description = "Credential id")),
    responses(
        (status = 200, description = "Deleted; its wrapped data keys are destroyed",
            body = CredentialDeleted),
        (status = 404, description = "No such credential", body = ErrorBody),
        (status = 409, description = "This keyward serves a bundle", body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn delete_credential() {}

#[utoipa::path(post, path = "/v1/credentials/{id}/test", tag = "credentials",
    params(("id" = String, Path, description = "Credential id")),
    request_body = Option<TestCredential>,
    responses(
        (status = 200, description = "The test call was made (ok says whether the provider \
            accepted the key); it is audited like any call. Only the masked preview of the key \
            and the provider's status are returned", body = CredentialTested),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 404, description = "No such credential or version", body = ErrorBody),
        (status = 409, description = "The credential or version cannot serve (revoked, retired, \
            past the max key age), or its target has no known read-only call", body = ErrorBody),
    ))]
fn test_credential() {}

#[utoipa::path(get, path = "/v1/clients", tag = "clients", params(ClientFilter),
    responses(
        (status = 200, description = "Clients (never their tokens)", body = Vec<Client>),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
fn list_clients() {}

#[utoipa::path(post, path = "/v1/clients", tag = "clients", request_body = NewClient,
    responses(
        (status = 201, description = "Created; the token is shown this once", body = ClientCreated),
        (status = 400, description = "Invalid name, team or workflow", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "The name is taken, or this keyward serves a bundle",
            body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn create_client() {}

#[utoipa::path(post, path = "/v1/clients/{id}/revoke", tag = "clients",
    params(("id" = String, Path, description = "Client id")),
    responses(
        (status = 200, description = "The token no longer authenticates", body = ClientRevoked),
        (status = 404, description = "No such client", body = ErrorBody),
        (status = 409, description = "Already revoked, or this keyward serves a bundle",
            body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn revoke_client() {}

#[utoipa::path(get, path = "/v1/audit/events", tag = "audit", params(AuditQuery),
    responses(
        (status = 200, description = "Matching rows, newest first", body = Vec<AuditRow>),
        (status = 400, description = "Malformed query or unknown event name", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
fn audit_events() {}

#[utoipa::path(post, path = "/v1/audit/search", tag = "audit", request_body = AuditQuery,
    responses(
        (status = 200, description = "Matching rows, newest first", body = Vec<AuditRow>),
        (status = 400, description = "Malformed filters or payload", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
fn audit_search() {}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    responses((status = 200, description = "The chain was walked; ok says whether it verified",
        body = VerifyReport)))]
fn audit_verify() {}

#[utoipa::path(get, path = "/v1/audit/lifecycle/{id}", tag = "audit",
    params(("id" = String, Path, description = "Credential id")),
    responses(
        (status = 200, description = "The credential's history, oldest first",
            body = Vec<AuditRow>),
        (status = 404, description = "No history for this id", body = ErrorBody),
    ))]
fn audit_lifecycle() {}

#[utoipa::path(get, path = "/v1/audit/export", tag = "audit",
    responses((status = 200, description = "The state of audit_export", body = AuditExport)))]
fn audit_export() {}

#[utoipa::path(post, path = "/v1/bundle", tag = "daemon", request_body = Option<ExportBundle>,
    responses(
        (status = 200, description = "A sealed bundle (ciphertext only) with the next serial",
            body = Bundle),
        (status = 400, description = "Unknown tenant or malformed body", body = ErrorBody),
        (status = 409, description = "This keyward serves a bundle", body = ErrorBody),
    ))]
fn export_bundle() {}

#[utoipa::path(get, path = "/v1/spend", tag = "daemon", params(SpendFilter),
    responses(
        (status = 200, description = "Cost and tokens per group", body = Vec<SpendRow>),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
    ))]
fn spend() {}

#[utoipa::path(get, path = "/v1/prices", tag = "daemon", params(PriceFilter),
    responses(
        (status = 200, description = "The price table in effect, USD per million tokens",
            body = Vec<Price>),
        (status = 400, description = "Malformed query", body = ErrorBody),
    ))]
fn prices() {}

#[utoipa::path(get, path = "/v1/budgets", tag = "governance", params(RuleFilter),
    responses(
        (status = 200, description = "Budgets with their spend this period", body = Vec<Budget>),
        (status = 400, description = "Malformed query", body = ErrorBody),
    ))]
fn list_budgets() {}

#[utoipa::path(post, path = "/v1/budgets", tag = "governance", request_body = NewBudget,
    responses(
        (status = 200, description = "Set (replacing one of the same scope and period)",
            body = Budget),
        (status = 400, description = "Invalid amount, period, scope or alert", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn set_budget() {}

#[utoipa::path(delete, path = "/v1/budgets/{id}", tag = "governance",
    params(("id" = String, Path, description = "Budget id")),
    responses(
        (status = 200, description = "Deleted", body = RuleDeleted),
        (status = 404, description = "No such budget", body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn delete_budget() {}

#[utoipa::path(get, path = "/v1/limits", tag = "governance", params(RuleFilter),
    responses(
        (status = 200, description = "Rate limits with this minute's use", body = Vec<Limit>),
        (status = 400, description = "Malformed query", body = ErrorBody),
    ))]
fn list_limits() {}

#[utoipa::path(post, path = "/v1/limits", tag = "governance", request_body = NewLimit,
    responses(
        (status = 200, description = "Set (replacing one of the same scope)", body = Limit),
        (status = 400, description = "Invalid scope or figures", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn set_limit() {}

#[utoipa::path(delete, path = "/v1/limits/{id}", tag = "governance",
    params(("id" = String, Path, description = "Limit id")),
    responses(
        (status = 200, description = "Deleted", body = RuleDeleted),
        (status = 404, description = "No such limit", body = ErrorBody),
        (status = 503, description = "The audit record could not be written; nothing changed",
            body = ErrorBody),
    ))]
fn delete_limit() {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::{Method, route};

    #[test]
    fn the_served_document_is_the_one_in_the_repository() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/admin/openapi.json");
        let served = document();
        if std::env::var_os("KEYWARD_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &served).unwrap();
        }
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == served,
            "src/admin/openapi.json differs from the generated document; regenerate it with \
             KEYWARD_WRITE_OPENAPI=1 cargo test --lib admin::openapi"
        );
        let v: serde_json::Value = serde_json::from_str(&served).unwrap();
        assert_eq!(v["openapi"], "3.1.0");
    }

    #[test]
    fn every_documented_operation_is_routed_and_every_route_is_documented() {
        let doc = AdminApi::openapi();
        let mut operations = 0;
        for (path, item) in &doc.paths.paths {
            let concrete = path.replace("{id}", "x_1");
            for (method, op) in [
                (Method::Get, &item.get),
                (Method::Post, &item.post),
                (Method::Delete, &item.delete),
            ] {
                if op.is_some() {
                    operations += 1;
                    assert!(
                        route(method, &concrete).is_ok(),
                        "{method:?} {path} is documented but not routed"
                    );
                } else {
                    assert!(
                        route(method, &concrete).is_err(),
                        "{method:?} {path} is routed but not documented"
                    );
                }
            }
        }
        // One per variant of `Route`.
        assert_eq!(operations, 29);
    }
}
