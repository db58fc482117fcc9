//! Request attributes (target, model, capability) and credential selection: which keys of the
//! caller's tenant may serve this request, in the order to try them. Pure: no I/O, no secrets.

pub mod attrs;
pub mod multipart;

use std::sync::Arc;

use crate::auth::Principal;
use crate::catalog::{Catalog, VersionState, version_state};
use crate::store::{CredentialRow, TenantRow, VersionRow};
use attrs::Capability;

/// What a request asks for, as far as scope is concerned.
#[derive(Debug, Clone)]
pub struct RequestAttrs {
    /// Target name.
    pub target: String,
    /// Model, when the family names one.
    pub model: Option<String>,
    /// Capability read from the path.
    pub capability: Capability,
}

/// One credential version that may serve the request.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The credential.
    pub credential: Arc<CredentialRow>,
    /// Index into `credential.versions`.
    pub version_index: usize,
    /// Past the tenant's max key age, served because the policy is `warn`.
    pub expired_warn: bool,
    /// A superseded version inside its rotation overlap (fallback only).
    pub overlapping: bool,
}

impl Candidate {
    /// The version row.
    pub fn version(&self) -> &VersionRow {
        &self.credential.versions[self.version_index]
    }
}

/// Why no credential may serve the request; decided before anything goes upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denial {
    /// No credential allows this attribute value.
    #[error("{message}")]
    Scope {
        /// target, model, capability, team, workflow or state.
        attribute: &'static str,
        /// What failed, naming the attribute and value.
        message: String,
    },
    /// The only matching keys are past the tenant's max key age and the policy is `deny`.
    #[error("{0}")]
    Policy(String),
}

/// Matches `*` (any run) and `?` (one character) globs, case-sensitively.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    // Price and scope lookups run this for every call: ASCII (every model id seen so far)
    // matches byte by byte without allocating; anything else by characters.
    if pattern.is_ascii() && text.is_ascii() {
        return glob_match_units(pattern.as_bytes(), text.as_bytes(), b'*', b'?');
    }
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    glob_match_units(&p, &t, '*', '?')
}

fn glob_match_units<T: Copy + PartialEq>(p: &[T], t: &[T], any: T, one: T) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        // A `*` in the pattern is a wildcard even where the text holds a literal `*`.
        if pi < p.len() && p[pi] == any {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && (p[pi] == one || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == any)
}

fn allows(list: &[String], value: Option<&str>, matches: impl Fn(&str, &str) -> bool) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|item| matches(item, v)))
}

/// The candidates for a request, best first: live current versions ordered by priority (equal
/// priorities rotated by `rotation` for round-robin), then overlapping versions as fallback.
pub fn select(
    catalog: &Catalog,
    principal: &Principal,
    attrs: &RequestAttrs,
    now: i64,
    rotation: usize,
) -> Result<Vec<Candidate>, Denial> {
    let tenant = catalog.tenant(&principal.tenant_id);
    let mut creds: Vec<&Arc<CredentialRow>> = catalog
        .credentials(&principal.tenant_id)
        .iter()
        .filter(|c| c.target == attrs.target && c.revoked_at.is_none())
        .collect();
    let deny = |attribute: &'static str, message: String| Denial::Scope { attribute, message };
    if creds.is_empty() {
        return Err(deny(
            "target",
            format!(
                "tenant `{}` has no credential for target `{}`",
                principal.tenant_name, attrs.target
            ),
        ));
    }
    let model = attrs.model.as_deref();
    creds.retain(|c| allows(&c.models, model, glob_match));
    if creds.is_empty() {
        return Err(deny(
            "model",
            match model {
                Some(m) => format!(
                    "model `{m}` is not allowed by any credential of this tenant for target `{}`",
                    attrs.target
                ),
                None => format!(
                    "the request names no model, and every credential for target `{}` is limited \
                     to certain models",
                    attrs.target
                ),
            },
        ));
    }
    let cap = attrs.capability.as_str();
    creds.retain(|c| allows(&c.capabilities, Some(cap), |a, b| a == b));
    if creds.is_empty() {
        return Err(deny(
            "capability",
            format!(
                "capability `{cap}` is not allowed by any credential for target `{}`",
                attrs.target
            ),
        ));
    }
    let team = principal.team.as_deref();
    creds.retain(|c| allows(&c.teams, team, |a, b| a == b));
    if creds.is_empty() {
        return Err(deny(
            "team",
            match team {
                Some(t) => format!(
                    "team `{t}` may not use the credentials for target `{}`",
                    attrs.target
                ),
                None => format!(
                    "the credentials for target `{}` are limited to teams and this client has none",
                    attrs.target
                ),
            },
        ));
    }
    let workflow = principal.workflow.as_deref();
    creds.retain(|c| allows(&c.workflows, workflow, |a, b| a == b));
    if creds.is_empty() {
        return Err(deny(
            "workflow",
            match workflow {
                Some(w) => format!(
                    "workflow `{w}` may not use the credentials for target `{}`",
                    attrs.target
                ),
                None => format!(
                    "the credentials for target `{}` are limited to workflows: send header \
                     keyward-workflow",
                    attrs.target
                ),
            },
        ));
    }
    let candidates = live_versions(&creds, tenant.map(Arc::as_ref), now)?;
    Ok(order(candidates, rotation))
}

/// Why a credential cannot be pinned for an operator's test call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// No credential has this id.
    #[error("no credential {0}; see `keyward cred list`")]
    Unknown(String),
    /// The credential or the requested version cannot serve (revoked, retired, or past the
    /// tenant's max key age under `deny`): the message says which and what to do.
    #[error("{0}")]
    NotServing(String),
}

/// The one credential version an operator's test call (`keyward cred test`) uses: `version`,
/// or the credential's current version. Scope allowlists do not apply (the operator names the
/// key); the lifecycle and the tenant's max-key-age policy do, as for any call. Returns the
/// candidate and the id of its tenant.
pub fn pinned(
    catalog: &Catalog,
    credential_id: &str,
    version: Option<u32>,
    now: i64,
) -> Result<(Candidate, String), PinError> {
    let cred = catalog
        .credentials_by_tenant
        .values()
        .flatten()
        .find(|c| c.id == credential_id)
        .ok_or_else(|| PinError::Unknown(credential_id.to_string()))?;
    let tenant = catalog.tenant(&cred.tenant_id).map(Arc::as_ref);
    let not_serving = |what: String| PinError::NotServing(what);
    if cred.revoked_at.is_some() {
        return Err(not_serving(format!(
            "credential {credential_id} is revoked; there is nothing to test (add a new one \
             with `keyward cred add`)"
        )));
    }
    let live = live_versions(&[cred], tenant, now).map_err(|d| match d {
        Denial::Policy(_) => not_serving(format!(
            "every live version of {credential_id} is older than the tenant's max key age \
             (policy: deny), so no call may use it; rotate it with `keyward cred rotate`"
        )),
        Denial::Scope { .. } => not_serving(format!(
            "credential {credential_id} has no active version (all are revoked or retired)"
        )),
    })?;
    let chosen = match version {
        None => live.into_iter().find(|c| !c.overlapping).ok_or_else(|| {
            not_serving(format!(
                "the current version of {credential_id} cannot serve (past the tenant's \
                     max key age, policy: deny); rotate it, or name an overlapping version \
                     with --version"
            ))
        })?,
        Some(n) => {
            let Some(v) = cred.versions.iter().find(|v| v.version == n) else {
                return Err(PinError::Unknown(format!("{credential_id} version {n}")));
            };
            let state = version_state(cred, v, now);
            let why = match state {
                VersionState::Current | VersionState::Overlapping => {
                    " but older than the tenant's max key age (policy: deny)"
                }
                _ => "",
            };
            live.into_iter()
                .find(|c| c.version().version == n)
                .ok_or_else(|| {
                    not_serving(format!(
                        "{credential_id} version {n} cannot serve: it is {}{why}",
                        state.as_str()
                    ))
                })?
        }
    };
    Ok((chosen, cred.tenant_id.clone()))
}

fn live_versions(
    creds: &[&Arc<CredentialRow>],
    tenant: Option<&TenantRow>,
    now: i64,
) -> Result<Vec<Candidate>, Denial> {
    let max_age = tenant.and_then(|t| t.max_key_age_s);
    let warn = tenant.is_some_and(|t| t.on_expiry == "warn");
    let mut live = Vec::new();
    let mut expired_only = false;
    for cred in creds {
        for (i, v) in cred.versions.iter().enumerate() {
            let state = version_state(cred, v, now);
            if !matches!(state, VersionState::Current | VersionState::Overlapping) {
                continue;
            }
            let expired = max_age.is_some_and(|max| now - v.created_at > max);
            if expired && !warn {
                expired_only = true;
                continue;
            }
            live.push(Candidate {
                credential: (*cred).clone(),
                version_index: i,
                expired_warn: expired,
                overlapping: state == VersionState::Overlapping,
            });
        }
    }
    if live.is_empty() {
        if expired_only {
            return Err(Denial::Policy(
                "every credential that matches is older than the tenant's max key age (policy: \
                 deny); rotate it with `keyward cred rotate`"
                    .into(),
            ));
        }
        return Err(Denial::Scope {
            attribute: "state",
            message: "no active credential version matches (all are revoked or retired)".into(),
        });
    }
    Ok(live)
}

/// Current before overlapping; within each, by priority; equal priorities rotated.
fn order(mut candidates: Vec<Candidate>, rotation: usize) -> Vec<Candidate> {
    candidates.sort_by(|a, b| {
        (
            a.overlapping,
            a.credential.priority,
            &a.credential.id,
            a.version().version,
        )
            .cmp(&(
                b.overlapping,
                b.credential.priority,
                &b.credential.id,
                b.version().version,
            ))
    });
    let mut out = Vec::with_capacity(candidates.len());
    let mut start = 0;
    while start < candidates.len() {
        let key = (
            candidates[start].overlapping,
            candidates[start].credential.priority,
        );
        let end = candidates[start..]
            .iter()
            .position(|c| (c.overlapping, c.credential.priority) != key)
            .map_or(candidates.len(), |n| start + n);
        let group = &mut candidates[start..end];
        let len = group.len();
        group.rotate_left(rotation % len);
        out.extend_from_slice(group);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Snapshot, TenantRow};

    #[test]
    fn globs() {
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        // `?` is one character, not one byte, outside ASCII.
        assert!(glob_match("caf?", "café"));
        assert!(!glob_match("caf??", "café"));
        assert!(glob_match("*é-?", "modèle-é-x"));
        assert!(glob_match("gpt-4o*", "gpt-4o"));
        assert!(!glob_match("gpt-4o*", "gpt-4"));
        assert!(glob_match("*", ""));
        assert!(glob_match("claude-?-*", "claude-3-opus"));
        assert!(!glob_match("gpt-4o", "gpt-4o-mini"));
        assert!(glob_match("*mini", "gpt-4o-mini"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        // A literal `*` in the text does not use up the pattern's wildcard.
        assert!(glob_match("a*b", "a*xb"));
        assert!(glob_match("modèle-*b", "modèle-*xb"));
        assert!(!glob_match("a*b", "a*x"));
    }

    fn version(v: u32, created_at: i64, overlap_until: Option<i64>) -> VersionRow {
        VersionRow {
            version: v,
            wrapped_data_key: vec![],
            ciphertext: vec![],
            preview: String::new(),
            created_at,
            overlap_until,
            retired_at: None,
            revoked_at: None,
        }
    }

    fn cred(id: &str, priority: i64, models: &[&str], versions: Vec<VersionRow>) -> CredentialRow {
        CredentialRow {
            id: id.into(),
            tenant_id: "t".into(),
            target: "openai".into(),
            name: id.into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            capabilities: vec![],
            teams: vec![],
            workflows: vec![],
            priority,
            created_at: 0,
            revoked_at: None,
            kind: Default::default(),
            versions,
        }
    }

    fn setup(creds: Vec<CredentialRow>, max_age: Option<i64>, on_expiry: &str) -> Catalog {
        Catalog::build(Snapshot {
            tenants: vec![TenantRow {
                id: "t".into(),
                name: "acme".into(),
                wrapped_key: vec![],
                wrapped_fp_key: vec![],
                max_key_age_s: max_age,
                on_expiry: on_expiry.into(),
                rotation_overlap_s: None,
                created_at: 0,
            }],
            clients: vec![],
            credentials: creds,
        })
    }

    fn principal() -> Principal {
        Principal {
            client_id: "c".into(),
            tenant_id: "t".into(),
            tenant_name: "acme".into(),
            team: None,
            workflow: None,
            peer: None,
        }
    }

    fn attrs(model: Option<&str>) -> RequestAttrs {
        RequestAttrs {
            target: "openai".into(),
            model: model.map(String::from),
            capability: Capability::Chat,
        }
    }

    #[test]
    fn denial_names_the_failing_attribute() {
        let cat = setup(
            vec![cred("a", 1, &["gpt-4o*"], vec![version(1, 0, None)])],
            None,
            "deny",
        );
        let err = select(&cat, &principal(), &attrs(Some("o1")), 10, 0).unwrap_err();
        assert!(
            matches!(
                &err,
                Denial::Scope { attribute: "model", message } if message.contains("`o1`")
            ),
            "{err:?}"
        );
        let mut other = attrs(Some("gpt-4o"));
        other.target = "anthropic".into();
        assert!(matches!(
            select(&cat, &principal(), &other, 10, 0),
            Err(Denial::Scope {
                attribute: "target",
                ..
            })
        ));
        assert_eq!(
            select(&cat, &principal(), &attrs(Some("gpt-4o")), 10, 0)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_pinned_test_uses_the_named_version_or_the_current_one_whatever_the_scope() {
        // Two rotations: v1 retired at 5, v2 overlaps until 100, v3 is current; the scope
        // allows one model only, and a test names none.
        let c = cred(
            "a",
            1,
            &["gpt-4o*"],
            vec![
                version(1, 0, Some(5)),
                version(2, 0, Some(100)),
                version(3, 10, None),
            ],
        );
        let cat = setup(vec![c], None, "deny");
        let (chosen, tenant) = pinned(&cat, "a", None, 50).unwrap();
        assert_eq!((chosen.version().version, tenant.as_str()), (3, "t"));
        assert!(!chosen.overlapping);
        let (chosen, _) = pinned(&cat, "a", Some(2), 50).unwrap();
        assert_eq!(chosen.version().version, 2);
        assert!(chosen.overlapping);
        let e = pinned(&cat, "a", Some(1), 50).unwrap_err();
        assert_eq!(
            e,
            PinError::NotServing("a version 1 cannot serve: it is retired".into())
        );
        assert!(matches!(
            pinned(&cat, "a", Some(9), 50),
            Err(PinError::Unknown(_))
        ));
        assert_eq!(
            pinned(&cat, "b", None, 50).unwrap_err().to_string(),
            "no credential b; see `keyward cred list`"
        );
        // The tenant's max key age still applies: the key is 50 s old at 50.
        let mut c = cred("a", 1, &[], vec![version(1, 0, None)]);
        let cat = setup(vec![c.clone()], Some(30), "deny");
        let refused = pinned(&cat, "a", None, 50).unwrap_err();
        assert!(
            matches!(&refused, PinError::NotServing(m) if m.contains("max key age")),
            "{refused:?}"
        );
        let cat = setup(vec![c.clone()], Some(30), "warn");
        assert!(pinned(&cat, "a", None, 50).unwrap().0.expired_warn);
        c.revoked_at = Some(1);
        let cat = setup(vec![c], None, "deny");
        let refused = pinned(&cat, "a", None, 50).unwrap_err();
        assert!(
            matches!(&refused, PinError::NotServing(m) if m.contains("is revoked")),
            "{refused:?}"
        );
    }

    #[test]
    fn priority_then_round_robin_then_overlap() {
        let cat = setup(
            vec![
                cred("a", 1, &[], vec![version(1, 0, None)]),
                cred(
                    "b",
                    1,
                    &[],
                    vec![version(1, 0, Some(100)), version(2, 0, None)],
                ),
                cred("c", 2, &[], vec![version(1, 0, None)]),
            ],
            None,
            "deny",
        );
        let ids = |r: usize| {
            select(&cat, &principal(), &attrs(None), 10, r)
                .unwrap()
                .iter()
                .map(|c| format!("{}/v{}", c.credential.id, c.version().version))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0), ["a/v1", "b/v2", "c/v1", "b/v1"]);
        assert_eq!(ids(1), ["b/v2", "a/v1", "c/v1", "b/v1"]);
        // After the overlap ends, the old version is no longer offered.
        let later = select(&cat, &principal(), &attrs(None), 100, 0).unwrap();
        assert_eq!(later.len(), 3);
    }

    #[test]
    fn max_key_age_deny_and_warn() {
        let creds = || vec![cred("a", 1, &[], vec![version(1, 0, None)])];
        let deny = setup(creds(), Some(50), "deny");
        assert!(matches!(
            select(&deny, &principal(), &attrs(None), 100, 0),
            Err(Denial::Policy(_))
        ));
        assert_eq!(
            select(&deny, &principal(), &attrs(None), 10, 0)
                .unwrap()
                .len(),
            1
        );
        let warn = setup(creds(), Some(50), "warn");
        let c = select(&warn, &principal(), &attrs(None), 100, 0).unwrap();
        assert!(c[0].expired_warn);
    }

    #[test]
    fn key_age_counts_from_the_versions_creation_and_the_limit_itself_is_allowed() {
        let deny = setup(
            vec![cred("a", 1, &[], vec![version(1, 1000, None)])],
            Some(50),
            "deny",
        );
        // Exactly max_key_age old still serves; a second more does not.
        assert_eq!(
            select(&deny, &principal(), &attrs(None), 1050, 0)
                .unwrap()
                .len(),
            1
        );
        assert!(matches!(
            select(&deny, &principal(), &attrs(None), 1051, 0),
            Err(Denial::Policy(_))
        ));
    }

    #[test]
    fn an_absent_model_team_or_workflow_does_not_pass_an_allowlist() {
        let limited = |teams: &[&str], workflows: &[&str]| {
            let mut c = cred("a", 1, &["gpt-4o*"], vec![version(1, 0, None)]);
            c.teams = teams.iter().map(|s| s.to_string()).collect();
            c.workflows = workflows.iter().map(|s| s.to_string()).collect();
            setup(vec![c], None, "deny")
        };
        let cat = limited(&[], &[]);
        assert!(matches!(
            select(&cat, &principal(), &attrs(None), 10, 0),
            Err(Denial::Scope { attribute: "model", message }) if message.contains("names no model")
        ));
        let cat = limited(&["search"], &[]);
        assert!(matches!(
            select(&cat, &principal(), &attrs(Some("gpt-4o")), 10, 0),
            Err(Denial::Scope {
                attribute: "team",
                ..
            })
        ));
        let mut member = principal();
        member.team = Some("search".into());
        assert!(select(&cat, &member, &attrs(Some("gpt-4o")), 10, 0).is_ok());
        let cat = limited(&[], &["batch"]);
        assert!(matches!(
            select(&cat, &principal(), &attrs(Some("gpt-4o")), 10, 0),
            Err(Denial::Scope {
                attribute: "workflow",
                ..
            })
        ));
        let mut batch = principal();
        batch.workflow = Some("batch".into());
        assert!(select(&cat, &batch, &attrs(Some("gpt-4o")), 10, 0).is_ok());
    }

    #[test]
    fn a_capability_allowlist_admits_only_the_capabilities_it_names() {
        let mut embeddings_only = cred("e", 1, &[], vec![version(1, 0, None)]);
        embeddings_only.capabilities = vec!["embeddings".into()];
        let cat = setup(vec![embeddings_only.clone()], None, "deny");
        // A chat call may not use a key limited to embeddings.
        assert!(matches!(
            select(&cat, &principal(), &attrs(None), 10, 0),
            Err(Denial::Scope { attribute: "capability", message })
                if message.contains("`chat`")
        ));
        let mut embeddings = attrs(None);
        embeddings.capability = Capability::Embeddings;
        assert_eq!(
            select(&cat, &principal(), &embeddings, 10, 0)
                .unwrap()
                .len(),
            1
        );
        // Beside an unlimited key, the limited one is not offered for chat.
        let cat = setup(
            vec![
                embeddings_only,
                cred("any", 2, &[], vec![version(1, 0, None)]),
            ],
            None,
            "deny",
        );
        let chat = select(&cat, &principal(), &attrs(None), 10, 0).unwrap();
        assert_eq!(
            chat.iter()
                .map(|c| c.credential.id.as_str())
                .collect::<Vec<_>>(),
            ["any"]
        );
    }

    #[test]
    fn a_pinned_version_refused_for_its_age_says_so_and_a_retired_one_does_not() {
        // v1 overlaps until 60, v2 is current; the tenant's limit is 30 s.
        let c = cred(
            "a",
            1,
            &[],
            vec![version(1, 0, Some(60)), version(2, 40, None)],
        );
        let cat = setup(vec![c], Some(30), "deny");
        // At 50, v1 (50 s old) is overlapping but too old; v2 (10 s) serves.
        assert_eq!(
            pinned(&cat, "a", Some(1), 50).unwrap_err(),
            PinError::NotServing(
                "a version 1 cannot serve: it is overlapping but older than the tenant's max \
                 key age (policy: deny)"
                    .into()
            )
        );
        assert_eq!(
            pinned(&cat, "a", Some(2), 50).unwrap().0.version().version,
            2
        );
        // At 61, v1 is retired: its age is not the reason.
        assert_eq!(
            pinned(&cat, "a", Some(1), 61).unwrap_err(),
            PinError::NotServing("a version 1 cannot serve: it is retired".into())
        );
    }
}
